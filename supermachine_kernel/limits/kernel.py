"""One kernel process under the host's limits: before its first VM it checks the VM's size,
takes its VM slot (accounting.py) and joins its user's cgroup (cgroup.py); a launch or a
%snapshot past a limit is refused with `LimitExceeded`; `report()` says, limit by limit, how
each is held on this host or why it is not (the kernel's log at start, and %vm).

`enter()` runs once per process, on whichever thread comes first: the start-up's early VM
restore (startup/sequence.py, with the warm snapshot's size) or the kernel's first launch
(with the configured size). The slot is the process's until it exits, except while its VM is
idle-suspended (machine/idle.py): `suspend()` gives it back, `resume()` takes it again before
the VM is restored (LimitExceeded if others took it meanwhile; the suspend snapshot stays).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import typing as t

from . import limits_file
from .accounting import Ledger, LimitExceeded, Slot, check_snapshot_quota, check_vm_size
from .cgroup import HostFacts, Outcome, apply, plan, remove_stale_leaves
from .config import ConfigError, MicroVMLimits, load

log = logging.getLogger("supermachine_kernel.limits")

_COUNTED = {
    "vms_per_user": "counted by the kernels (a slot per VM, freed when its kernel ends)",
    "memory_per_vm": "checked at kernel start (the VM's size caps its guest)",
    "vcpus_per_vm": "checked at kernel start",
    "snapshot_quota": "checked by %snapshot before and after it writes",
    "host_max_vms": "counted by the kernels (a slot per VM, freed when its kernel ends)",
}


class KernelLimits:
    """This process's standing under the limits (see the module doc)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or limits_file()
        self._lock = threading.Lock()
        self.limits: MicroVMLimits | None = None
        self.error: str | None = None  # the limits file is broken
        self.slot: Slot | None = None
        self.cgroups: Outcome | None = None
        self._loaded = False
        self._suspended_mib: int | None = None  # the slot's size while the VM is suspended

    def load(self) -> MicroVMLimits | None:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                try:
                    self.limits = load(self.path)
                except ConfigError as e:
                    self.error = str(e)
                    log.error("%s", e)
            return self.limits

    def enter(self, memory_mib: int, vcpus: int, label: str = "") -> None:
        """Before a VM starts: raises LimitExceeded if this kernel may not run one of this size
        (the admin's file broken counts as a refusal: limits were meant to hold)."""
        limits = self.load()
        if self.error is not None:
            raise LimitExceeded(f"{self.error}. No VM starts until the admin fixes it.")
        if limits is None or not limits.any_set():
            return
        check_vm_size(limits, memory_mib, vcpus)
        with self._lock:
            if self.cgroups is None:
                self.cgroups = self._join_cgroup(limits)
            if self.slot is not None and self.slot.held:
                if self.slot.memory_mib >= memory_mib:
                    return
                self.slot.release()  # the configured VM is larger than the one first counted
            self.slot = Ledger(limits).acquire(memory_mib, label or f"kernel pid {os.getpid()}")

    def suspend(self) -> bool:
        """The kernel's VM was suspended to disk: its slot goes back to the other kernels.
        Returns True if one was held (then `resume()` takes it again)."""
        with self._lock:
            if self.slot is None or not self.slot.held:
                return False
            self._suspended_mib = self.slot.memory_mib
            self.slot.release()
            self.slot = None
            return True

    def resume(self) -> None:
        """Before a suspended VM is restored: its slot again. Raises LimitExceeded (naming
        the limit) when the user's or the host's VMs are at their limit now."""
        with self._lock:
            mib = self._suspended_mib
            limits = self.limits
            if mib is None or limits is None or not limits.any_set():
                self._suspended_mib = None
                return
            if self.slot is None or not self.slot.held:
                self.slot = Ledger(limits).acquire(mib, f"kernel pid {os.getpid()}")
            self._suspended_mib = None

    @staticmethod
    def _join_cgroup(limits: MicroVMLimits) -> Outcome:
        uid, pid = os.geteuid(), os.getpid()
        p = plan(limits, HostFacts.read(), uid, pid)
        remove_stale_leaves(p)
        out = apply(p, pid)
        for limit, how in out.enforced.items():
            log.info("limit %s enforced: %s", limit, how)
        for limit, why in out.not_enforced.items():
            log.warning("limit %s is NOT enforced on this host: %s", limit, why)
        return out

    def check_snapshot(self, used_bytes: t.Callable[[], int], taken_bytes: int = 0) -> None:
        """%snapshot: before (taken_bytes=0) and after it wrote `taken_bytes`."""
        limits = self.load()
        if limits is None or not limits.snapshot_quota_mib:
            return
        check_snapshot_quota(limits, used_bytes(), os.geteuid(), taken_bytes)

    def report(self) -> list[tuple[str, str]]:
        """(limit, how it is held or why not) for every limit set; for %vm."""
        limits = self.load()
        if self.error is not None:
            return [("limits", f"BROKEN: {self.error}")]
        if limits is None:
            return [("limits", f"none ({self.path} does not exist)")]
        if not limits.any_set():
            return [("limits", f"none set in {self.path}")]
        outcome = self.cgroups
        rows = []
        for name, value in limits.summary().items():
            if name in _COUNTED:
                how = _COUNTED[name]
            elif outcome is None:
                how = "not applied yet (no VM started)"
            elif name in outcome.enforced:
                how = "enforced: " + outcome.enforced[name]
            else:
                how = "NOT enforced: " + outcome.not_enforced.get(name, "?")
            rows.append((f"limit {name}", f"{value}; {how}"))
        return rows


_current: KernelLimits | None = None
_current_lock = threading.Lock()


def current() -> KernelLimits:
    """This process's KernelLimits."""
    global _current
    with _current_lock:
        if _current is None:
            _current = KernelLimits()
        return _current


def enter_for_snapshot(warm_snapshot: str) -> None:
    """The start-up's early restore of `warm_snapshot`: enter with the size it was taken at."""
    try:
        with open(os.path.join(warm_snapshot, "metadata.json")) as f:
            machine = json.load(f).get("machine") or {}
        memory, vcpus = int(machine.get("memory_mib", 0)), int(machine.get("vcpus", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        memory, vcpus = 0, 1
    if not memory:
        raise LimitExceeded(f"the size of {warm_snapshot} is unknown: it is not restored early")
    current().enter(memory, vcpus)


def gate(backend: t.Any, memory_mib: int, vcpus: int, startup: t.Any = None) -> t.Any:
    """The kernel's VM backend with its launches under the limits: each launch enters first
    (a refused launch raises LimitExceeded, the cell says so, the next cell tries again). The
    VM the start-up restored early is released when the kernel may not run it."""
    limits = current()
    try:
        limits.enter(memory_mib, vcpus)
    except LimitExceeded as e:
        log.error("%s", e)
        early = startup.take_vm() if startup is not None else None
        if early is not None:
            early.release()
    launch = backend.launch

    def launch_within_limits(*args: t.Any, **kwargs: t.Any) -> t.Any:
        limits.enter(memory_mib, vcpus)
        return launch(*args, **kwargs)

    backend.launch = launch_within_limits
    return backend
