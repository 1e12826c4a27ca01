"""%snapshots: this notebook's snapshots as a table (HTML and plain text); --all: every group's."""
from __future__ import annotations

import html
import time

from ..machine import Machine, format_size
from . import ArgumentParser, Context

_parser = ArgumentParser("snapshots")
_parser.add_argument("--all", "-a", action="store_true")

COLUMNS = ("name", "created", "size", "parent")
GROUP_COLUMNS = ("group", "snapshots", "size", "latest", "notebook or kernel")
RIGHT = {"size", "snapshots"}  # right-aligned columns
MAX_NAMES = 8  # names listed per group in --all


async def magic(ctx: Context, args: str) -> None:
    """List this notebook's snapshots: name, when it was created, its size on disk and its
    parent (the snapshot the session's state came from when it was taken; "-" for the kernel's
    fresh start). The one the running session came from is marked with "*".

        %snapshots          this notebook's snapshots (its group: the notebook's path under
                            Jupyter Server, else this kernel, restarts included)
        %snapshots --all    every group in the store: its name, what it belongs to, its
                            snapshots; restore one of them with %restore GROUP/NAME

    Restore one with ``%restore NAME``; delete one with ``%snapshot --delete NAME`` (or
    GROUP/NAME); see every notebook's disk usage with ``%snapshot --report``.
    """
    opts = _parser.parse(args)
    machine = ctx.machine
    if opts.all:
        return _all(ctx, machine)
    own = machine.snapshots
    entries = own.entries()
    if not entries:
        ctx.print(f"No snapshots for this notebook yet (group {own.key}: {own.label}). "
                  "Take one with %snapshot [name]; %snapshots --all lists other notebooks'.")
        return
    names = {e.name for e in entries}
    rows = []
    for e in entries:
        mark = "*" if e.name == machine.head else ""
        known = e.parent is None or e.parent in names or "/" in e.parent  # GROUP/NAME: elsewhere
        parent = e.parent if known else f"{e.parent} (deleted)"
        rows.append((mark + e.name, _when(e.created), format_size(e.size_bytes), parent or "-"))
    total = format_size(sum(e.size_bytes for e in entries))
    caption = f"Group {own.key}: {own.label}"
    footer = f"{len(entries)} snapshot(s), {total} on disk; * = the running session's origin"
    ctx.display({"text/plain": _text(COLUMNS, rows, footer, caption),
                 "text/html": _html(COLUMNS, rows, footer, caption)})


def _all(ctx: Context, machine: Machine) -> None:
    own = machine.snapshots
    rows, lines = [], []
    groups = machine.store.groups(own)
    if own not in groups:  # no folder yet: still show which group is this notebook's
        groups = sorted([*groups, own], key=lambda g: g.key)
    for nb in groups:
        entries = nb.entries()
        if not entries and nb is not own:
            continue
        here = " (this notebook)" if nb is own else ""
        latest = _when(entries[-1].created) if entries else "-"
        rows.append((nb.key, str(len(entries)), format_size(sum(e.size_bytes for e in entries)),
                     latest, nb.label + here))
        if entries:
            names = [e.name for e in entries]
            more = f", … ({len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else ""
            lines.append(f"{nb.key}/: {', '.join(names[-MAX_NAMES:])}{more}")
    footer = ("Restore one with %restore GROUP/NAME (a plain NAME is looked up in this "
              "notebook's group only).")
    caption = f"Snapshot groups under {machine.store.root}"
    text = _text(GROUP_COLUMNS, rows, "\n".join([*lines, footer]), caption)
    detail = "".join(f"<li><code>{html.escape(ln)}</code></li>" for ln in lines)
    page = _html(GROUP_COLUMNS, rows, footer, caption).replace(
        "<p><small>", f"<ul>{detail}</ul><p><small>", 1)
    ctx.display({"text/plain": text, "text/html": page})


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _text(columns: tuple, rows: list, footer: str, caption: str) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(  # noqa: E731
        (c.rjust(w) if col in RIGHT else c.ljust(w))
        for col, c, w in zip(columns, cells, widths)).rstrip()
    return "\n".join([caption, line(columns), line(["-" * w for w in widths]), *map(line, rows),
                      footer])


def _html(columns: tuple, rows: list, footer: str, caption: str) -> str:
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:{"right" if col in RIGHT else "left"}">'
                         f"{html.escape(c)}</td>" for col, c in zip(columns, r)) + "</tr>"
        for r in rows)
    return (f'<table class="supermachine-snapshots"><caption>{html.escape(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p><small>{html.escape(footer)}</small></p>")
