"""The IOPub relay: everything the guest says unasked, published to the frontend, rate limited.

`IopubRelay.on_guest_event` is the guest REPL client's event callback (repl_client/client.py
calls it on the shell loop, in guest order): output (stream, display, execute_result, error,
clear_output) and the guest's comm messages are published on IOPub with the request the guest
works for as their parent; input_request goes to the stdin relay (stdin.py); a dead guest and
an invalid frame become a notice on stderr. `publish` is also how the kernel's own messages
(errors, notices, host widgets) reach IOPub.

Notices about what the guest sent count against the rate limit like output, and quote at most
NOTICE_QUOTE characters of anything the guest made (a forged frame's type, the error naming
it) with its full size, so a guest cannot put megabytes on the frontend or into the kernel log
through them. The kernel log gets at most `LogLimiter.burst` lines per cause per minute; the
line after a quiet spell says how many were left out; the frontend at most NOTICES_PER_CELL
invalid-frame notices per cell, then one count at the cell's end.

Rate limiting (`RateLimiter`, pure): the knobs and defaults of jupyter_server's
`iopub_msg_rate_limit` / `iopub_data_rate_limit` / `rate_limit_window`. Within each window of
`window` seconds at most `msg_rate * window` messages and `data_rate * window` bytes pass; the
rest is dropped and counted, and the user is told once per window and in a summary at the end
of the cell. A limit of 0 disables that limit. The first error of a cell always passes, so a
flood cannot hide why a cell failed.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from ipykernel.kernelbase import Kernel

from ..log_limit import LogLimiter, quote
from .stdin import StdinRelay

NOTICES_PER_CELL = 5
DISPLAY_EVENTS = ("display_data", "update_display_data")
COMM_EVENTS = ("comm_open", "comm_msg", "comm_close")
LIMITED_EVENTS = ("stream", *DISPLAY_EVENTS, "execute_result", "error", "clear_output", *COMM_EVENTS)


@dataclass
class Dropped:
    messages: int = 0
    bytes: int = 0


class RateLimiter:
    def __init__(self, msg_rate: float, data_rate: float, window: float) -> None:
        self.msg_rate = msg_rate
        self.data_rate = data_rate
        self.window = max(window, 0.001)
        self._start: float | None = None
        self._msgs = 0
        self._bytes = 0
        self.dropped = Dropped()
        self._noticed_this_window = False

    def allow(self, nbytes: int, now: float) -> bool:
        """Whether a message of `nbytes` may be published at time `now`."""
        if self._start is None or now - self._start >= self.window:
            self._start = now
            self._msgs = 0
            self._bytes = 0
            self._noticed_this_window = False
        over_msgs = self.msg_rate > 0 and self._msgs + 1 > self.msg_rate * self.window
        over_data = self.data_rate > 0 and self._bytes + nbytes > self.data_rate * self.window
        if over_msgs or over_data:
            self.dropped.messages += 1
            self.dropped.bytes += nbytes
            return False
        self._msgs += 1
        self._bytes += nbytes
        return True

    def should_notice(self) -> bool:
        """True once per window after the first drop in it."""
        if self.dropped.messages and not self._noticed_this_window:
            self._noticed_this_window = True
            return True
        return False

    def take_dropped(self) -> Dropped:
        dropped, self.dropped = self.dropped, Dropped()
        return dropped


def approx_size(content: dict) -> int:
    """The bytes an output message's content counts against the data rate limit."""
    data = content.get("data") or {}
    size = 0
    for value in data.values():
        size += len(value) if isinstance(value, str) else len(json.dumps(value))
    return size + len(content.get("text", ""))


class IopubRelay:
    """One per kernel: publishes on the kernel's IOPub socket, and relays guest events there.

    `cell_parent` is the execute request running now (None between cells); `last_parent` the
    latest request the guest worked for, the parent of what it says between cells."""

    def __init__(self, kernel: Kernel, stdin: StdinRelay, limiter: RateLimiter,
                 guest_noun: str) -> None:
        self._kernel = kernel
        self._stdin = stdin
        self._limiter = limiter
        self._guest_noun = guest_noun
        self.cell_parent: dict | None = None
        self.last_parent: dict = {}
        self._cell_error_seen = False
        self._log_limiter = LogLimiter()
        self._invalid_notices = 0  # invalid-frame notices since the cell began

    def begin_cell(self, parent: dict) -> None:
        self.cell_parent = self.last_parent = parent
        self._cell_error_seen = False
        self._invalid_notices = 0

    def end_cell(self) -> None:
        unshown = self._invalid_notices - NOTICES_PER_CELL
        if unshown > 0:
            self._notice(f"[supermachine] {unshown} more invalid messages from the guest were "
                         "dropped in this cell.\n")
        self._invalid_notices = 0
        self.report_dropped(final=True)
        self.cell_parent = None

    def publish(self, msg_type: str, content: dict, *, buffers: list | None = None,
                metadata: dict | None = None, parent: dict | None = None) -> None:
        """One IOPub message; its parent is `parent`, else the running cell, else the last
        request. Runs on the shell loop."""
        kernel = self._kernel
        session = kernel.session
        if session is None:
            return
        session.send(
            kernel.iopub_socket,
            msg_type,
            content,
            parent if parent is not None else (self.cell_parent or self.last_parent),
            ident=f"kernel.{kernel.ident}.{msg_type}".encode(),
            buffers=buffers,
            metadata=metadata,
        )

    def on_guest_event(self, kind: str, content: dict, buffers: list) -> None:
        """Called on the shell loop, in guest order, for everything the guest says unasked."""
        if kind in LIMITED_EVENTS:
            size = approx_size(content) + sum(len(b) for b in buffers)
            first_error = kind == "error" and not self._cell_error_seen
            if not self._limiter.allow(size, time.monotonic()) and not first_error:
                self.report_dropped(final=False)
                return
            if kind == "error":
                self._cell_error_seen = True
            if kind in COMM_EVENTS:
                metadata = content.pop("__metadata__", {})
                self.publish(kind, content, buffers=buffers, metadata=metadata)
            else:
                self.publish(kind, content)
        elif kind == "input_request":
            asyncio.ensure_future(self._stdin.forward(content))
        elif kind == "died":
            self._stdin.cancel()
            if self.cell_parent is None:  # nothing running: tell whoever is watching
                self.publish("stream", {
                    "name": "stderr",
                    "text": f"The {self._guest_noun} died ({content['reason']}); a fresh one is "
                            "starting. Variables from earlier cells are gone.\n",
                })
        elif kind == "invalid":
            what = (f"an invalid {quote(content['type'], 60)!r} message from the guest "
                    f"({content.get('size', 0)} bytes): {quote(content['error'])}")
            left_out = self._log_limiter.allow("invalid guest message", time.monotonic())
            if left_out is not None:
                more = f" ({left_out} more left out of this log)" if left_out else ""
                self._kernel.log.warning("dropped %s%s", what, more)
            self._invalid_notices += 1
            if self._invalid_notices <= NOTICES_PER_CELL:
                self._notice(f"[supermachine] dropped {what}\n")

    def _notice(self, text: str) -> None:
        """A notice on stderr, counted against the output rate limit like output."""
        if not self._limiter.allow(len(text), time.monotonic()):
            self.report_dropped(final=False)
            return
        self.publish("stream", {"name": "stderr", "text": text})

    def report_dropped(self, final: bool) -> None:
        """The notice that output is being dropped (once per window), or at the end of a cell
        (`final`) how much was."""
        limiter = self._limiter
        if final:
            dropped = limiter.take_dropped()
            if not dropped.messages:
                return
            text = (
                f"\n[supermachine] IOPub rate limit: {dropped.messages} output messages "
                f"({dropped.bytes / 1e6:.1f} MB) were dropped in this cell.\n"
            )
        elif limiter.should_notice():
            text = (
                "\n[supermachine] IOPub output rate exceeded: output is being dropped to keep the "
                "frontend responsive.\nCurrent limits: "
                f"c.MicroVMKernel.iopub_data_rate_limit = {limiter.data_rate:g} bytes/s, "
                f"c.MicroVMKernel.iopub_msg_rate_limit = {limiter.msg_rate:g} msgs/s "
                f"(over {limiter.window:g} s; 0 disables).\n"
            )
        else:
            return
        self.publish("stream", {"name": "stderr", "text": text})
