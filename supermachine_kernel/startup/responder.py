"""The early responder: the kernel's first kernel_info reply, sent before ipykernel is loaded.

Once the shell and iopub sockets are bound (sockets.py), `EarlyResponder` (a thread)
answers kernel_info_requests from the launch hint and welcomes iopub subscribers. Any other
request (and every request after one it could not answer, so replies keep their order) is kept
unanswered and handed to the kernel, which dispatches them before anything else; a kept request
that is correctly signed has its `busy` status published at once, as ipykernel does when a
request arrives. Frontends that take any idle status of their session as the end of the cell
they just sent (jupyter console) would otherwise read the idle that followed the kernel_info
reply as that cell's, stop waiting for its input_request and hang (`x = input()` as a first
cell). At most MAX_KEPT requests are kept; later ones stay on the socket. `stop()` ends the
thread before the kernel takes the sockets over. sequence.py starts it.

The wire helpers (`sign`, `parse_request`, `message`) are pure (no I/O).
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import threading
import uuid
from typing import Any, Optional

log = logging.getLogger("supermachine_kernel.startup.responder")

DELIM = b"<IDS|MSG>"
POLL_MS = 10
MAX_KEPT = 100  # requests kept for the kernel; the rest wait on the socket


# -- wire format (Jupyter messaging: identities, delimiter, HMAC, four JSON parts) ------------


def sign(key: bytes, scheme: str, parts: list[bytes]) -> bytes:
    """The hex HMAC of the four message parts (empty when there is no key)."""
    if not key:
        return b""
    algorithm = scheme.split("-", 1)[1] if scheme.startswith("hmac-") else scheme
    mac = hmac.new(key, digestmod=getattr(hashlib, algorithm))
    for part in parts:
        mac.update(part)
    return mac.hexdigest().encode()


def parse_request(frames: list[bytes], key: bytes, scheme: str) -> Optional[tuple[list[bytes], dict]]:
    """(identities, header) of a correctly signed message, or None."""
    try:
        at = frames.index(DELIM)
    except ValueError:
        return None
    parts = frames[at + 2:at + 6]
    if len(parts) != 4 or not hmac.compare_digest(frames[at + 1], sign(key, scheme, parts)):
        return None
    try:
        header = json.loads(parts[0])
    except ValueError:
        return None
    return (frames[:at], header) if isinstance(header, dict) else None


def message(key: bytes, scheme: str, session: str, protocol: str, msg_type: str, content: dict,
            parent: dict, prefix: tuple[bytes, ...] = ()) -> list[bytes]:
    """The frames of one message: `prefix` (identities or an iopub topic), then the rest."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "supermachine",
        "session": session,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": protocol,
    }
    parts = [json.dumps(p).encode() for p in (header, parent, {}, content)]
    return [*prefix, DELIM, sign(key, scheme, parts), *parts]


# -- the responder thread ---------------------------------------------------------------------


class EarlyResponder:
    """Answers kernel_info_requests, keeps other requests for the kernel and greets iopub
    subscribers until `stop()`."""

    def __init__(self, shell: Any, iopub: Any, key: bytes, scheme: str, kernel_info: dict) -> None:
        self._shell = shell
        self._iopub = iopub
        self._key = key
        self._scheme = scheme
        self._info = dict(kernel_info, status="ok")
        self._protocol = str(kernel_info.get("protocol_version", "5.3"))
        self._session = uuid.uuid4().hex
        self._stop = threading.Event()
        self.answered = False  # a kernel_info_request was answered (and status published)
        self.stash: list[list[bytes]] = []  # requests left for the kernel, in arrival order
        self._thread = threading.Thread(target=self._run, name="early-responder", daemon=True)
        self._thread.start()

    def _send(self, sock: Any, msg_type: str, content: dict, parent: dict,
              prefix: tuple[bytes, ...] = ()) -> None:
        sock.send_multipart(message(self._key, self._scheme, self._session, self._protocol,
                                    msg_type, content, parent, prefix))

    def _run(self) -> None:
        import zmq  # noqa: PLC0415 - already imported by the early sockets

        poller = zmq.Poller()
        poller.register(self._shell, zmq.POLLIN)
        poller.register(self._iopub, zmq.POLLIN)
        shell_open = True
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(POLL_MS))
                if self._iopub in ready:
                    for frame in self._iopub.recv_multipart():
                        if frame[:1] == b"\x01":  # a subscription: welcome it (JEP 65)
                            topic = frame[1:]
                            self._send(self._iopub, "iopub_welcome",
                                       {"subscription": topic.decode("utf-8", "replace")}, {},
                                       (topic,) if topic else ())
                if shell_open and self._shell in ready:
                    self._answer(self._shell.recv_multipart())
                    if len(self.stash) >= MAX_KEPT:  # the rest waits on the socket
                        shell_open = False
                        poller.unregister(self._shell)
        except Exception:  # noqa: BLE001 - the kernel still starts; it answers from now on
            log.exception("early responder failed")

    def _answer(self, frames: list[bytes]) -> None:
        parsed = parse_request(frames, self._key, self._scheme)
        topic = f"kernel.{self._session}.status".encode()
        if parsed is None or parsed[1].get("msg_type") != "kernel_info_request" or self.stash:
            self.stash.append(frames)  # the kernel dispatches it (and rejects it if invalid)
            if parsed is not None:
                self._send(self._iopub, "status", {"execution_state": "busy"}, parsed[1],
                           (topic,))
            return
        idents, parent = parsed
        self._send(self._iopub, "status", {"execution_state": "busy"}, parent, (topic,))
        self._send(self._shell, "kernel_info_reply", self._info, parent, tuple(idents))
        self._send(self._iopub, "status", {"execution_state": "idle"}, parent, (topic,))
        self.answered = True

    def stop(self) -> list[list[bytes]]:
        """Stops the thread (the sockets are the caller's again); returns the kept requests."""
        self._stop.set()
        self._thread.join()
        return self.stash
