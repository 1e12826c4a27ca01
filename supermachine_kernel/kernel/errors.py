"""Errors as the user sees them in a cell: the one formatter of error contents and execute
replies (the kernel's guest failures and the host magics use it), and the one-sentence summary
of why a guest died. Pure: no I/O.
"""
from __future__ import annotations

import re
import typing as t

RED, RESET = "\x1b[0;31m", "\x1b[0m"

BAKING_NOTICE = (
    "[supermachine] First start with this configuration: baking the warm VM snapshot (boot, "
    "start Python, import the warmup modules). Under TCG this takes a few minutes, once; "
    "`supermachine-kernel prepare` does it ahead of time.\n"
)

_NOTABLE = re.compile(r"panic|out of memory|oom-kill|killed process|exited|killed by|signal",
                      re.IGNORECASE)


def error_content(ename: str, evalue: str, lines: t.Iterable[str] = ()) -> dict:
    """An `error` message's content: `ename: evalue` in red, then `lines` (details, the hint
    that says what to do next) as the traceback."""
    return {"ename": ename, "evalue": evalue,
            "traceback": [f"{RED}{ename}{RESET}: {evalue}", *lines]}


def execute_error_reply(content: dict) -> dict:
    """The execute_reply for a cell that failed with the error `content`."""
    return dict(content, status="error", user_expressions={}, payload=[])


def summarize_death(reason: str, max_details: int = 8) -> tuple[str, list[str]]:
    """A guest death reason (which may end in a whole console dump) as one readable sentence
    plus a few notable detail lines for the traceback."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    if not lines:
        return "no reason was reported.", []
    head = lines[0]
    notable = [ln for ln in lines[1:] if _NOTABLE.search(ln)]
    summary = " ".join([head, *notable[:2]])
    if len(summary) > 500:
        summary = summary[:497] + "..."
    details = [ln for ln in lines[1:] if ln not in notable[:2]][-max_details:]
    return summary.rstrip(".") + ".", details


def guest_noun(backend: str) -> str:
    """What the guest is called in messages: the microVM, or the process of another backend."""
    return "microVM" if backend == "vm" else f"guest process ({backend} backend)"
