"""IOPub output rate limiting (pure): drop output past a budget instead of flooding the frontend.

Same knobs and defaults spirit as jupyter_server's `iopub_msg_rate_limit` /
`iopub_data_rate_limit` / `rate_limit_window`: within each window of `window` seconds at most
`msg_rate * window` messages and `data_rate * window` bytes pass; the rest is dropped and counted,
and the kernel tells the user once per window and in a summary at the end of the cell.
A limit of 0 disables that limit.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Dropped:
    messages: int = 0
    bytes: int = 0


class RateLimiter:
    def __init__(self, msg_rate: float, data_rate: float, window: float) -> None:
        self.msg_rate = msg_rate
        self.data_rate = data_rate
        self.window = max(window, 0.001)
        self._start = None
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
