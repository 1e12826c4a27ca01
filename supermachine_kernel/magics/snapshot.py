"""%snapshot: capture the whole VM (variables, guest files, threads, processes) under a name."""
from __future__ import annotations

import shutil
from typing import Callable

from ..machine import Machine, NotebookSnapshot, StoreError, format_size, split_ref
from . import ArgumentParser, Context, MagicError

_parser = ArgumentParser("snapshot")
_parser.add_argument("name", nargs="?")
_parser.add_argument("new_name", nargs="?")
_group = _parser.add_mutually_exclusive_group()
_group.add_argument("--delete", action="store_true")
_group.add_argument("--force", "-f", action="store_true")
_group.add_argument("--report", action="store_true")
_group.add_argument("--rename", action="store_true")


async def magic(ctx: Context, args: str) -> None:
    """Capture the whole microVM — every variable, file written in the guest, background thread
    and process — as a named snapshot of this notebook, between cells.

        %snapshot               snapshot under a generated name (snap-1, snap-2, …)
        %snapshot NAME          snapshot under NAME (letters, digits, '.', '_', '-')
        %snapshot --force NAME  replace the existing snapshot NAME
        %snapshot --delete NAME delete snapshot NAME and report the space freed (GROUP/NAME:
                                another notebook's, see %snapshots --all)
        %snapshot --rename NAME NEW   rename snapshot NAME of this notebook to NEW
        %snapshot --report      disk usage of the snapshots of every notebook

    Prints the name, its size on disk and the time taken. Go back to it with
    ``%restore NAME`` (even from a later kernel session: snapshots live under
    ``jupyter --data-dir``/supermachine-kernel/snapshots/, one folder per notebook); list them
    with ``%snapshots``.
    """
    opts = _parser.parse(args)
    machine = ctx.machine
    nb = machine.snapshots
    try:
        if opts.report:
            return _report(ctx, machine)
        if opts.delete:
            if not opts.name:
                raise MagicError("%snapshot --delete needs the name of the snapshot to delete",
                                 "usage: %snapshot --delete NAME", ename="UsageError")
            key, name = split_ref(opts.name)
            group = nb if key is None else machine.store.group(key, nb)
            ref = group.ref(name)
            machine.forget_snapshot(ref)
            freed = group.delete(name)
            ctx.print(f"Deleted snapshot {ref!r}: freed {format_size(freed)}. "
                      f"{_summary(group.entries(), group.foreign)}")
            return None
        if opts.rename:
            if not opts.name or not opts.new_name:
                raise MagicError("%snapshot --rename needs the snapshot's name and its new name",
                                 "usage: %snapshot --rename NAME NEW", ename="UsageError")
            machine.forget_snapshot(opts.name)
            nb.rename(opts.name, opts.new_name)
            if machine.head == opts.name:
                machine.head = opts.new_name
            ctx.print(f"Renamed snapshot {opts.name!r} to {opts.new_name!r}.")
            return None
        if opts.new_name:
            raise MagicError(f"%snapshot takes one name (got {opts.name!r} and {opts.new_name!r})",
                             "usage: %snapshot [name]; rename with %snapshot --rename NAME NEW",
                             ename="UsageError")
        name = opts.name or nb.new_name()
        quota = _quota_check(machine)
        quota(0)  # already at the quota: nothing is written
        if opts.force:
            machine.forget_snapshot(name)
            try:
                nb.delete(name)
            except StoreError:
                pass  # nothing to replace
        head = machine.head
        entry = await machine.snapshot(name)
        try:
            quota(entry.size_bytes)
        except MagicError:
            machine.forget_snapshot(name)
            nb.delete(name)
            machine.head = head
            raise
    except StoreError as e:
        raise MagicError(str(e), ename="SnapshotError") from e
    parent = f", parent {entry.parent!r}" if entry.parent else ""
    ctx.print(f"Snapshot {entry.name!r}: {format_size(entry.size_bytes)} on disk, taken in "
              f"{entry.took_s:.2f} s ({entry.kind or 'full'}{parent}). "
              f"{_summary(nb.entries())} Restore with %restore {entry.name}")
    return None


def _quota_check(machine: Machine) -> Callable[[int], None]:
    """check(taken_bytes): the host's snapshot quota (supermachine_kernel/limits) against
    every snapshot of this user's store; raises MagicError past it."""
    from .. import limits  # noqa: PLC0415 - imports nothing; kernel.py only on limited hosts

    if not limits.active():
        return lambda taken: None
    from ..limits.accounting import LimitExceeded  # noqa: PLC0415
    from ..limits.kernel import current  # noqa: PLC0415

    def check(taken: int) -> None:
        try:
            current().check_snapshot(lambda: sum(r[3] for r in machine.store.notebooks()), taken)
        except LimitExceeded as e:
            raise MagicError(str(e), ename="LimitExceeded") from None

    return check


def _summary(entries: list[NotebookSnapshot], foreign: bool = False) -> str:
    whose = "That group" if foreign else "This notebook"
    if not entries:
        return f"{whose} has no snapshots now."
    total = sum(e.size_bytes for e in entries)
    s = "" if len(entries) == 1 else "s"
    return f"{whose}'s {len(entries)} snapshot{s} use {format_size(total)}."


def _report(ctx: Context, machine: Machine) -> None:
    store = machine.store
    rows = [(key, f"{key}: {label}", count, size) for key, label, count, size in store.notebooks()]
    lines = [f"Snapshots under {store.root}:"]
    if not rows:
        lines.append("  (none)")
    width = max((len(label) for _, label, _, _ in rows), default=8)
    for key, label, count, size in sorted(rows, key=lambda r: -r[3]):
        here = "  <- this notebook" if key == machine.snapshots.key else ""
        lines.append(f"  {label:<{width}}  {count:>3} snapshot(s)  {format_size(size):>10}{here}")
    total = sum(r[3] for r in rows)
    lines.append(f"Total: {format_size(total)}.")
    try:
        free = shutil.disk_usage(store.root if rows else "/").free
        lines.append(f"Free on that disk: {format_size(free)}.")
    except OSError:
        pass
    entries = sorted(machine.snapshots.entries(), key=lambda e: -e.size_bytes)
    if entries:
        lines.append("This notebook's largest: " + ", ".join(
            f"{e.name} ({format_size(e.size_bytes)})" for e in entries[:5]))
        lines.append("Free space with %snapshot --delete NAME (another group's: GROUP/NAME).")
    ctx.print("\n".join(lines))
    return None
