"""The kernel's shell and iopub sockets, bound in the kernel process's first milliseconds.

A frontend connects right after it has started the kernel process, and ZMQ retries a refused
connection every 100 ms (`reconnect_ivl`). ipykernel binds its sockets only after its imports
(~250 ms), so the first kernel_info used to wait a further 0-100 ms for the frontend's next retry.
`EarlySockets.bind(argv)` binds the shell and iopub sockets before those imports, so the frontend
connects while they run and its first request is waiting when the kernel starts reading;
`MicroVMKernelApp` adopts them (its `init_sockets` and `init_iopub`). Only the plain case is
handled — TCP, ports given in the connection file (with or without CurveZMQ keys) — anything
else, or any error, leaves the binding to ipykernel as before.

Earlier still, `listeners.EarlyListeners` opens plain listening sockets on those ports,
and `EarlySockets.bind` hands them to ZMQ (listeners.py says why).

Imports nothing heavy: it runs before ipykernel is loaded.
"""
from __future__ import annotations

import os
from typing import Any

from .listeners import EarlyListeners, connection_file_arg, plain_tcp_info


class EarlySockets:
    """A ZMQ context with the shell ROUTER and iopub XPUB sockets bound to their ports."""

    def __init__(self, context: Any, ip: str, shell_port: int, iopub_port: int,
                 shell: Any, iopub: Any) -> None:
        self.context = context
        self.ip = ip
        self.shell_port = shell_port
        self.iopub_port = iopub_port
        self.shell = shell
        self.iopub = iopub
        # The message-signing key and scheme from the connection file (sequence.py answers
        # the first kernel_info with them); None when the file's key is not usable as given.
        self.key: bytes | None = None
        self.signature_scheme = "hmac-sha256"
        # The CurveZMQ server secret key the sockets encrypt with (z85), if the file has one.
        self.curve_secretkey: bytes | None = None

    @classmethod
    def bind(cls, argv: list[str],
             listeners: EarlyListeners | None = None) -> "EarlySockets | None":
        """Binds the sockets named by the connection file in `argv`; None if not possible.

        Listening sockets `listeners` opened for those ports are taken over; whatever is not
        taken is closed, so ipykernel can bind the ports itself when this returns None."""
        try:
            return cls._bind(argv, listeners)
        finally:
            if listeners is not None:
                listeners.close()

    @classmethod
    def _bind(cls, argv: list[str], listeners: EarlyListeners | None) -> "EarlySockets | None":
        # The listeners read the connection file already; read it here only without them.
        info = listeners.info if listeners is not None else plain_tcp_info(connection_file_arg(argv))
        if info is None:
            return None
        try:
            import zmq  # noqa: PLC0415
        except ImportError:
            return None
        ip, shell_port, iopub_port = info["ip"], int(info["shell_port"]), int(info["iopub_port"])
        # Both keys or neither: plain_tcp_info checked.
        secret, public = info.get("curve_secretkey"), info.get("curve_publickey")
        context = zmq.Context()
        sockets = []
        try:
            for kind, port in ((zmq.ROUTER, shell_port), (zmq.XPUB, iopub_port)):
                sock = context.socket(kind)
                sockets.append(sock)
                sock.linger = 1000
                if secret and public:  # as ipykernel's _apply_curve_server_options
                    sock.curve_secretkey = secret.encode()
                    sock.curve_publickey = public.encode()
                    sock.curve_server = True
                fd = listeners.take(ip, port) if listeners is not None else None
                if fd is not None:
                    try:
                        sock.setsockopt(zmq.USE_FD, fd)  # ZMQ owns (and closes) it from now on
                    except Exception:
                        os.close(fd)
                        raise
                sock.bind(f"tcp://{ip}:{port}")
        except Exception:  # noqa: BLE001 - e.g. the port is taken: ipykernel will say so
            for sock in sockets:
                sock.close(linger=0)
            context.term()
            return None
        early = cls(context, ip, shell_port, iopub_port, *sockets)
        early.curve_secretkey = secret.encode() if secret else None
        key, scheme = info.get("key", ""), info.get("signature_scheme", "hmac-sha256")
        if isinstance(key, str) and scheme in ("hmac-sha256", "hmac-sha512", "hmac-md5", "hmac-sha1"):
            early.key, early.signature_scheme = key.encode(), scheme
        return early

    def matches(self, app: Any) -> bool:
        """Whether the kernel app was configured with exactly these sockets."""
        return (app.transport == "tcp" and app.ip == self.ip and app.shell_port == self.shell_port
                and app.iopub_port == self.iopub_port
                and getattr(app, "curve_secretkey", None) == self.curve_secretkey)

    def close(self) -> None:
        self.shell.close(linger=0)
        self.iopub.close(linger=0)
        self.context.term()
