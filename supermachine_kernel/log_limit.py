"""What the guest makes the host log or show, kept small: per-cause line limits and quoting (pure).

Guest code can repeat at will whatever makes the host say something (an invalid frame, a line on
its REPL's stderr), and can make that text megabytes long. `LogLimiter` lets through at most
`burst` lines per cause in each window and counts the rest; `quote` cuts guest-made text to its
first characters and says how long it was. Used by the IOPub relay's notices (kernel/iopub.py)
and the guest REPL client's stderr log (repl_client/client.py).
"""
from __future__ import annotations

NOTICE_QUOTE = 200


def quote(text: str, limit: int = NOTICE_QUOTE) -> str:
    """`text` (made by the guest) cut to its first `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class LogLimiter:
    """At most `burst` log lines per cause in each `window` seconds (pure). Causes are fixed
    names chosen by the code that logs, never text from the guest, so the table stays small."""

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        self.burst = burst
        self.window = window
        self._causes: dict[str, list] = {}  # cause -> [window start, lines in it, left out]

    def allow(self, cause: str, now: float) -> int | None:
        """None: leave this line out. Otherwise log it; the number is how many lines of this
        cause were left out since the last one logged."""
        entry = self._causes.setdefault(cause, [now, 0, 0])
        if now - entry[0] >= self.window:
            entry[0], entry[1] = now, 0
        if entry[1] >= self.burst:
            entry[2] += 1
            return None
        entry[1] += 1
        left_out, entry[2] = entry[2], 0
        return left_out
