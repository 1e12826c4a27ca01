"""One kernel's workspace sync: the state between cells and the two passes around a cell.

    ws = WorkspaceSync(host_root=os.getcwd(), guest_root="/workspace", mode="sync", limits=...)
    message = ws.before_cell(vm)   # host -> guest; '' or the report to show in the cell
    ...run the cell...
    message = ws.after_cell(vm)    # guest -> host (mode "sync" only)

Each pass scans both sides (the host with scan.scan, the guest with one agent exec of
guest_side.py's `list`), plans (plan.plan), carries the plan out (transfer.push/pull) and keeps
the new state (plan.next_state). A report about a path is shown once: the same skipped path for
the same reason is not reported again by later passes.

With the guest REPL holding the workspace (the kernel: kernel/workspace_hook.py), `attach()`
gives the REPL's listing and an `apply` that asks the REPL: no guest process then lists the
guest. The guest tree is the REPL's last listing, kept up to date by each push (`guest`), and
`after_cell(vm, listing=...)` gets the listing the REPL put into the execute reply (None: the
workspace did not change in the guest, nothing to do). `clean` says whether the last push
left the guest exactly as `guest` says (the REPL may then drop the dirty flag the push's own
writes set).

A pass whose guest listing is refused (transfer.ListingError) changes nothing and says so.
"""
from __future__ import annotations

import datetime as dt
import os
from typing import Any

from .host_writer import HostWriter
from .plan import TO_GUEST, TO_HOST, Plan, Synced, next_state, plan
from .report import describe
from .scan import Limits, Scan, Skipped, scan
from .transfer import (
    Applier,
    GuestVm,
    ListingError,
    Outcome,
    list_guest,
    parse_guest_listing,
    pull,
    push,
)

MODES = ("sync", "read-only", "off")


class WorkspaceSync:
    def __init__(self, host_root: str | os.PathLike[str], guest_root: str, mode: str,
                 limits: Limits) -> None:
        if mode not in MODES:
            raise ValueError(f"workspace mode must be one of {MODES}, not {mode!r}")
        self.host_root = os.fspath(host_root)
        self.guest_root = guest_root
        self.mode = mode
        self.limits = limits
        self.state: dict[str, Synced] = {}
        self._reported: set[tuple[str, str, bool]] = set()
        self.guest: Scan | None = None      # the REPL's last listing (None: list per pass)
        self.apply: Applier | None = None
        self.clean = False

    def attach(self, listing: Any, apply: Applier) -> None:
        """The guest REPL holds the workspace: `listing` is its tree (guest_side's `list`
        output, parsed here as hostile input; ListingError), `apply` runs apply ops in it."""
        self.guest = parse_guest_listing(listing, self.limits)
        self.apply = apply

    def before_cell(self, vm: GuestVm, now: dt.datetime | None = None) -> str:
        """Carries the host's changes into the guest (conflicts: the guest's version is saved
        on the host first, in mode "sync"). Returns the message for the cell ('' if none)."""
        if self.mode == "off":
            return ""
        host, guest, error = self._scans(vm)
        if error:
            return error
        p = plan(self.state, host, guest, TO_GUEST, now)
        pulled = Outcome()
        if p.conflicts and self.mode == "sync":
            conflicts_only = Plan(TO_GUEST, conflicts=p.conflicts)
            with HostWriter(self.host_root) as w:
                pulled = pull(vm, w, self.guest_root, conflicts_only, guest, self.limits)
        elif p.conflicts:
            p.conflicts = []     # read-only: the host's version simply replaces the guest's
        pushed = self._push(vm, p, host, guest)
        self._keep(p, host, guest, pushed)
        return self._message(host.skipped, True, pulled.refused + pushed.refused, p,
                             host.unlisted)

    def after_cell(self, vm: GuestVm, now: dt.datetime | None = None,
                   listing: Any = None) -> str:
        """Brings the cell's changes back to the host (mode "sync"; other modes do nothing).
        Attached to the REPL: `listing` is the one from the execute reply, None when the
        workspace did not change in the guest."""
        if self.mode != "sync":
            return ""
        if self.guest is not None:
            if listing is None:
                return ""
            try:
                self.guest = parse_guest_listing(listing, self.limits)
            except ListingError as e:
                return f"The workspace was not synced this time: {e}."
        host, guest, error = self._scans(vm)
        if error:
            return error
        p = plan(self.state, host, guest, TO_HOST, now)
        with HostWriter(self.host_root) as w:
            pulled = pull(vm, w, self.guest_root, p, guest, self.limits)
        pushed = self._push(vm, p, host, guest) if p.to_guest else Outcome()
        self._keep(p, host, guest, pulled, pushed)
        return self._message(guest.skipped, False, pulled.refused + pushed.refused, p,
                             guest.unlisted)

    def _push(self, vm: GuestVm, p: Plan, host: Scan, guest: Scan) -> Outcome:
        """push(), and the REPL's listing brought up to date with what it did."""
        self.clean = False
        if not (p.to_guest or p.delete_in_guest):
            return Outcome()
        pushed = push(vm, self.host_root, self.guest_root, p, host, self.apply)
        if self.guest is not None:
            entries = dict(self.guest.entries)
            for d in pushed.deleted:
                for q in [q for q in entries if q == d or q.startswith(d + "/")]:
                    del entries[q]
            for c in pushed.copied:
                entries[c] = host.entries[c]
            self.guest = Scan(entries, guest.skipped, guest.unlisted)
            self.clean = not pushed.refused
        return pushed

    def forget(self) -> None:
        """The guest's tree is no longer the one the state describes (after `%restore` put
        back an older guest, or a restart gave a fresh one). The next `before_cell` compares
        with no state: files equal on both sides (size and mtime) are left as they are, files
        only on the host are copied in, files that differ are conflicts (the host's version
        kept and copied in, the guest's saved beside it on the host), files only in the guest
        come back after the cell. Nothing on the host is overwritten or deleted."""
        self.state = {}

    # ----

    def _scans(self, vm: GuestVm) -> tuple[Scan, Scan, str]:
        host = scan(self.host_root, self.limits)
        if self.guest is not None:
            return host, self.guest, ""
        try:
            guest = list_guest(vm, self.guest_root, self.limits)
        except ListingError as e:
            return host, Scan(), f"The workspace was not synced this time: {e}."
        return host, guest, ""

    def _keep(self, p: Plan, host: Scan, guest: Scan, *outcomes: Outcome) -> None:
        """The new state; a path whose copy or delete was refused keeps its old state, so the
        next pass sees the difference again (and never takes it for agreement)."""
        refused = {path for o in outcomes for path, _ in o.refused}
        done = Plan(p.direction,
                    to_guest=[x for x in p.to_guest if x not in refused],
                    delete_in_guest=[x for x in p.delete_in_guest if x not in refused],
                    to_host=[x for x in p.to_host if x not in refused],
                    delete_on_host=[x for x in p.delete_on_host if x not in refused])
        self.state = next_state(self.state, done, host, guest)

    def _message(self, skipped: list[Skipped], to_vm: bool, refused: list[tuple[str, str]],
                 p: Plan, unlisted: int = 0) -> str:
        fresh = [s for s in skipped if (s.path, s.reason, to_vm) not in self._reported]
        self._reported |= {(s.path, s.reason, to_vm) for s in skipped}
        clashes = [c for c in p.clashes if (c, "clash", True) not in self._reported]
        self._reported |= {(c, "clash", True) for c in clashes}
        return describe(fresh, self.limits, to_vm, refused=refused, conflicts=p.conflicts,
                        unlisted=unlisted, clashes=clashes)
