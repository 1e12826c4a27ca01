"""%snapshots: this notebook's snapshots as a table (HTML and plain text)."""
from __future__ import annotations

import html
import time

from . import ArgumentParser, Context

_parser = ArgumentParser("snapshots")

COLUMNS = ("name", "created", "size", "parent")


async def magic(ctx: Context, args: str) -> None:
    """List this notebook's snapshots: name, when it was created, its size on disk and its
    parent (the snapshot the session's state came from when it was taken; "-" for the kernel's
    fresh start). The one the running session came from is marked with "*".

    Restore one with ``%restore NAME``; delete one with ``%snapshot --delete NAME``; see every
    notebook's disk usage with ``%snapshot --report``.
    """
    from ..snapshots import format_size  # noqa: PLC0415

    _parser.parse(args)
    machine = ctx.machine
    entries = machine.snapshots.entries()
    if not entries:
        ctx.print(f"No snapshots for this notebook yet ({machine.snapshots.label}). "
                  "Take one with %snapshot [name].")
        return
    names = {e.name for e in entries}
    rows = []
    for e in entries:
        mark = "*" if e.name == machine.head else ""
        parent = e.parent if e.parent in names or e.parent is None else f"{e.parent} (deleted)"
        rows.append((mark + e.name, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.created)),
                     format_size(e.size_bytes), parent or "-"))
    total = format_size(sum(e.size_bytes for e in entries))
    footer = f"{len(entries)} snapshot(s), {total} on disk; * = the running session's origin"
    ctx.display({"text/plain": _text(rows, footer), "text/html": _html(rows, footer)})


def _text(rows: list, footer: str) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(  # noqa: E731
        (c.rjust(w) if i == 2 else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows), footer])


def _html(rows: list, footer: str) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:{"right" if i == 2 else "left"}">'
                         f"{html.escape(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows)
    return (f'<table class="supermachine-snapshots"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table><p><small>{html.escape(footer)}</small></p>")
