"""What one sync does: given the last synced state and the current host and guest scans, the
copies, deletes and conflicts of one direction (pure; no I/O).

Two passes per cell: `plan(..., TO_GUEST)` before it (the host's changes go into the guest)
and `plan(..., TO_HOST)` after it (the cell's changes come back). `SyncState` remembers, per
path, each side's `Entry.signature()` when the two sides last agreed; a side "changed" when its
signature differs from that (a new path, a deleted one, a new size or mtime, a kind change).

Rules, the same in both directions except which side's lone change is acted on:
- one side changed, the other did not: the change is carried over in its pass (a copy, a
  directory made, or a delete); in the other pass the path waits.
- both changed, both files: a conflict. The host's version stays and is copied into the guest;
  the guest's version is saved on the host beside it as `NAME (guest copy YYYY-MM-DD
  HHMMSS).ext` (`conflict_name`). Nothing on the host is overwritten by the guest.
- a delete never destroys a change made on the other side: changed beats deleted (the changed
  version is carried over, in the pass of the side that has it).
- both deleted, both directories, or both files of the same size and mtime (what a copy
  leaves, since copies carry the mtime): nothing to do, the sides agree. So a state that was
  forgotten (after a restore) costs no copies for what is still the same.
- a kind clash (a file on one side, a directory on the other, both changed) is left alone and
  listed in `Plan.clashes` for the report.
- paths a scan skipped (caps, symlinks, special files, bad names) are left alone on both
  sides: a file that grew over the cap on the host is not deleted in the guest.
- a scan cut short (`Scan.unlisted`) says nothing about the paths it does not name: they are
  left alone, so an incomplete listing never deletes anything.

Copies carry the source's mtime to the destination (transfer.py sets it), so after a pass
`next_state` knows both sides' signatures without scanning again.
"""
from __future__ import annotations

import datetime as _dt
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from .scan import DIR, FILE, Entry, Scan

TO_GUEST = "to_guest"
TO_HOST = "to_host"

Sig = Optional[tuple]


@dataclass(frozen=True)
class Synced:
    """Both sides' signatures when they last agreed on a path."""
    host: tuple
    guest: tuple


SyncState = Mapping[str, Synced]


@dataclass(frozen=True)
class Conflict:
    path: str
    guest_copy: str    # the host path the guest's version is saved under


@dataclass
class Plan:
    direction: str
    # host -> guest: files copied and directories made, parents first.
    to_guest: list[str] = field(default_factory=list)
    # guest paths deleted, children first.
    delete_in_guest: list[str] = field(default_factory=list)
    # guest -> host: files copied and directories made, parents first.
    to_host: list[str] = field(default_factory=list)
    # host paths deleted, children first.
    delete_on_host: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    clashes: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.to_guest or self.delete_in_guest or self.to_host or self.delete_on_host
                    or self.conflicts)


def _sig(e: Entry | None) -> Sig:
    return e.signature() if e is not None else None


def _depth_key(p: str) -> list[str]:
    return p.split("/")


def conflict_name(path: str, when: _dt.datetime, taken: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """`dir/NAME (guest copy YYYY-MM-DD HHMMSS).ext` beside `path`, not in `taken` (then
    ` 2`, ` 3`, ... is added inside the parenthesis)."""
    head, name = posixpath.split(path)
    stem, ext = posixpath.splitext(name)
    stamp = when.strftime("%Y-%m-%d %H%M%S")
    n = 1
    while True:
        tag = f" (guest copy {stamp})" if n == 1 else f" (guest copy {stamp} {n})"
        candidate = posixpath.join(head, f"{stem}{tag}{ext}")
        # A long name must still fit one component: shorten the stem, never the tag.
        while len(posixpath.basename(candidate).encode()) > 255 and stem:
            stem = stem[:-1]
            candidate = posixpath.join(head, f"{stem}{tag}{ext}")
        if candidate not in taken:
            return candidate
        n += 1


def plan(state: SyncState, host: Scan, guest: Scan, direction: str,
         now: _dt.datetime | None = None) -> Plan:
    """The operations of one pass (`TO_GUEST` before a cell, `TO_HOST` after it)."""
    if direction not in (TO_GUEST, TO_HOST):
        raise ValueError(f"direction must be {TO_GUEST!r} or {TO_HOST!r}, not {direction!r}")
    now = now or _dt.datetime.now()
    out = Plan(direction)
    left_alone = host.skipped_paths() | guest.skipped_paths()
    taken = set(host.entries) | host.skipped_paths()
    paths = set(host.entries) | set(guest.entries) | set(state)
    for p in sorted(paths, key=_depth_key):
        if p in left_alone:
            continue
        h, g, s = host.entries.get(p), guest.entries.get(p), state.get(p)
        if (h is None and host.unlisted) or (g is None and guest.unlisted):
            continue
        h_changed = _sig(h) != (s.host if s else None)
        g_changed = _sig(g) != (s.guest if s else None)
        if not h_changed and not g_changed:
            continue
        if h_changed and g_changed:
            if h is None and g is None:
                continue
            if h is not None and g is not None:
                if h.signature() == g.signature():
                    continue      # both now the same (a directory, or a file of equal size/mtime)
                if h.kind != g.kind:
                    out.clashes.append(p)
                    continue
                name = conflict_name(p, now, taken)
                taken.add(name)
                out.conflicts.append(Conflict(p, name))
                out.to_guest.append(p)
                continue
            # Changed beats deleted: carry the surviving version, in its side's pass.
            if h is not None and direction == TO_GUEST:
                out.to_guest.append(p)
            elif g is not None and direction == TO_HOST:
                out.to_host.append(p)
            continue
        if h_changed and direction == TO_GUEST:
            if h is not None:
                if g is not None and g.kind != h.kind:
                    out.clashes.append(p)
                elif not (g is not None and h.kind == DIR):
                    out.to_guest.append(p)
            elif g is not None:
                out.delete_in_guest.append(p)
        elif g_changed and direction == TO_HOST:
            if g is not None:
                if h is not None and h.kind != g.kind:
                    out.clashes.append(p)
                elif not (h is not None and g.kind == DIR):
                    out.to_host.append(p)
            elif h is not None:
                out.delete_on_host.append(p)
    out.delete_in_guest = _without_descendants_order(out.delete_in_guest)
    out.delete_on_host = _without_descendants_order(out.delete_on_host)
    return out


def _without_descendants_order(paths: list[str]) -> list[str]:
    """Children before their parents (a directory is deleted once it is empty)."""
    return sorted(paths, key=lambda p: (-p.count("/"), p))


def next_state(state: SyncState, done: Plan, host: Scan, guest: Scan) -> dict[str, Synced]:
    """The state after `done` was carried out in full (the scans are those it was planned
    from). Copies carry the source's signature to the destination; deleted paths are
    forgotten; paths the pass left waiting keep their old state. Paths where both sides agree
    without a copy (both deleted, both directories, equal file signatures) are recorded as
    agreeing."""
    new = dict(state)
    for p in done.to_guest:
        sig = host.entries[p].signature()
        new[p] = Synced(sig, sig)
    for p in done.to_host:
        sig = guest.entries[p].signature()
        new[p] = Synced(sig, sig)
    for p in done.delete_in_guest + done.delete_on_host:
        new.pop(p, None)
    acted = set(done.to_guest) | set(done.to_host)
    for p in set(host.entries) | set(guest.entries) | set(state):
        if p in acted:
            continue
        h, g = host.entries.get(p), guest.entries.get(p)
        if h is None and g is None:
            new.pop(p, None)
        elif h is not None and g is not None and h.signature() == g.signature():
            new[p] = Synced(h.signature(), g.signature())
    return new


__all__ = [
    "DIR",
    "FILE",
    "TO_GUEST",
    "TO_HOST",
    "Conflict",
    "Plan",
    "SyncState",
    "Synced",
    "conflict_name",
    "next_state",
    "plan",
]
