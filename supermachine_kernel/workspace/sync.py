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

The host tree is scanned again only when it may have changed (`HostTree`): an inotify watcher
(guest_side.Watcher, which runs on the host as well) says so, for a tree small enough to watch
on a local filesystem; otherwise every pass scans. `unchanged()` is the cheap check before a
cell: neither side changed since a pass that left nothing undone, so there is nothing to do.

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
# The host tree is watched (inotify) only up to this many directories, and not on network or
# FUSE filesystems (whose changes made elsewhere raise no inotify event here).
MAX_WATCHED_DIRS = 2000
UNWATCHABLE_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre",
                  "gpfs", "afs", "davfs", "sshfs", "virtiofs")


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` (from /proc/self/mountinfo), '' if unknown."""
    best, fstype = -1, ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount = fields[4].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > best:
                    best, fstype = len(mount), right.split()[0]
    except OSError:
        return ""
    return fstype


def watchable(root: str) -> bool:
    fstype = filesystem_type(os.path.realpath(root))
    return bool(fstype) and fstype not in UNWATCHABLE_FS and not fstype.startswith("fuse")


class HostTree:
    """The host tree's scan, done again only when the tree may have changed. With `watch`, an
    inotify watcher is set up after the first complete scan of at most MAX_WATCHED_DIRS
    directories (a change between that scan and the watch costs one more scan); without it,
    or past the watch limit, every `scan()` reads the tree."""

    def __init__(self, root: str, limits: Limits, watch: bool) -> None:
        self.root, self.limits, self.watch = root, limits, watch
        self._watcher: Any = None
        self._last: Scan | None = None
        self._due = True

    def may_have_changed(self) -> bool:
        if self._watcher is None or self._last is None:
            return True
        if self._watcher.dirty():
            self._due = True
        return self._due

    def scan(self) -> Scan:
        if not self.may_have_changed():
            assert self._last is not None
            return self._last
        self._due = False
        self._last = scan(self.root, self.limits)
        if self.watch and self._watcher is None and not self._last.unlisted and \
                sum(e.kind == "dir" for e in self._last.entries.values()) <= MAX_WATCHED_DIRS:
            from .guest_side import Watcher  # noqa: PLC0415 - ctypes, only when watching

            self._watcher = Watcher(self.root, list(self.limits.excludes),
                                    self.limits.exclude_hidden_dirs)
            self._due = True   # what changed before the watch was set is seen next time
        return self._last

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


class WorkspaceSync:
    def __init__(self, host_root: str | os.PathLike[str], guest_root: str, mode: str,
                 limits: Limits, watch_host: bool = False) -> None:
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
        self.host = HostTree(self.host_root, limits,
                             watch_host and mode != "off" and watchable(self.host_root))
        self._settled = False   # the last pass left nothing undone and nothing changed since

    def unchanged(self) -> bool:
        """Nothing for `before_cell` to do: the guest sent no new listing and the host tree
        did not change since a before_cell that left nothing undone (an inotify read)."""
        return self._settled and self.guest is not None and not self.host.may_have_changed()

    def attach(self, listing: Any, apply: Applier) -> None:
        """The guest REPL holds the workspace: `listing` is its tree (guest_side's `list`
        output, parsed here as hostile input; ListingError), `apply` runs apply ops in it."""
        self.guest = parse_guest_listing(listing, self.limits)
        self.apply = apply
        self._settled = False

    def before_cell(self, vm: GuestVm, now: dt.datetime | None = None) -> str:
        """Carries the host's changes into the guest (conflicts: the guest's version is saved
        on the host first, in mode "sync"). Returns the message for the cell ('' if none)."""
        if self.mode == "off":
            return ""
        self._settled = False
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
        self._settled = not (pulled.refused or pushed.refused)
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
            self._settled = False
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
        self._settled = False

    # ----

    def _scans(self, vm: GuestVm) -> tuple[Scan, Scan, str]:
        host = self.host.scan()
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
        # A tree past the file cap is said once per direction, like a skipped path: its
        # count of unlisted entries comes back with every pass over the same big tree.
        if unlisted and ("", "unlisted", to_vm) in self._reported:
            unlisted = 0
        elif unlisted:
            self._reported.add(("", "unlisted", to_vm))
        return describe(fresh, self.limits, to_vm, refused=refused, conflicts=p.conflicts,
                        unlisted=unlisted, clashes=clashes)
