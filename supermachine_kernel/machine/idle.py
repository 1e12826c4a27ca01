"""Idle suspend: a kernel whose guest sat idle for `c.MicroVMKernel.idle_suspend_after` seconds
snapshots its VM to disk, stops QEMU and so gives the VM's memory back; the next request that
needs the guest restores it and re-attaches the REPL first. Variables, files and processes come
back; the frontend only sees a slower first request.

Owns: when the guest counts as idle, the suspend, the resume, and the suspend snapshots on disk
(``<jupyter data dir>/supermachine-kernel/suspended/PID-START-N/``, in a 0700 folder; those of
kernel processes that are gone are removed when the next kernel starts).

Idle means all of these, checked every `period` seconds:
- no request to the guest (execute, complete, inspect, is_complete, history, comms, the magics
  that use the VM) and no guest output for `after` seconds, and no request pending (a cell
  waiting in input() or sleeping is not idle);
- the guest's CPU was quiet over the last sample window (busy time in the guest's /proc/stat
  under CPU_QUIET of the window), so a background thread or process that computes keeps its VM
  (a guest that cannot tell its CPU time is not suspended);
- no %expose port is listening (a connection would reach no VM; stop the exposure with
  ``%expose --stop PORT`` to let the kernel suspend), and no connection through the kernel's
  egress proxy is open (kernel/network.py; it would be cut). After a resume the egress
  forward is made again by the network's attach hook, which `GuestRepl.adopt` runs.
An interrupt while suspended does nothing and does not resume (nothing runs in a suspended
guest); a kernel_info_request (a frontend connected: a cell is likely to follow) starts the
resume in the background and is answered at once.

Suspend: ``vm.snapshot_incremental`` (the runtime's incremental snapshot: the device state
and only the guest RAM pages that differ from the template snapshot the VM was restored from,
its base, which the runtime names and checks; bench/idle.py measures it against the full one).
While suspended the kernel holds the base's memory file open, so `image prune`/`image rm`
(which skip what a process has open) leave it alone. When there is no usable base (a
cold-booted VM, a base replaced since the VM started) it is
``vm.snapshot``, the full template snapshot (a sparse file of every non-zero RAM page plus the
device state, ~290 MiB for the default image's warm kernel); the log says why.
``SUPERMACHINE_IDLE_SNAPSHOT=full`` always takes the full one. Then the guest is released
without a successor, and so are the VMs kept ahead for this kernel (the pool's warm VM, a
%restore standby), and the kernel's VM slot under the host's limits (limits/kernel.py) goes back
to the other kernels. A suspend that fails (a full disk) leaves the VM running and is tried
again after another idle period. Resume: the VM slot is taken again first (past a limit the
request fails with the limits' message, and the snapshot is kept for the next request to try
again); then the snapshot is verified and restored (an incremental one over its base, mapped
copy-on-write again), the REPL re-attached by its process id and adopted (`GuestRepl.adopt`,
which says hello; the agent sets the clock and reseeds the RNGs after a restore). The
snapshot's files are unlinked as soon as the restored QEMU maps them. A resume that fails (the
snapshot damaged or deleted, or its base gone or changed) starts a fresh VM and the cell that
asked fails with `GuestDied` saying so (a completion or inspection that asked is answered by
the fresh VM, the frontend is told on IOPub, and the next cell fails the same way); the kernel
process and its sockets carry on. A shell request being handled (e.g. %snapshot, which runs no
guest request) also keeps the VM.

Everything here runs on the guest's event loop; blocking work goes to worker threads.
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

from jupyter_core.paths import jupyter_data_dir

from .. import limits
from ..repl_client import GuestDied, GuestUnavailable
from ..repl_client.attach import attach_repl
from ..repl_client.vm import VmHandle, describe_vm

log = logging.getLogger("supermachine_kernel.machine.idle")

CPU_QUIET = 0.05  # busy share of the guest's CPU time over a window that still counts as idle
MAX_PERIOD = 30.0  # seconds between idle checks, at most
RESUME_TIMEOUT = 60.0  # seconds the restored REPL has to answer


class IdleError(Exception):
    """A suspend or resume step failed; the message says which and why."""


def default_root() -> str:
    """Where suspend snapshots live: beside the notebook snapshots, on disk (a snapshot in a
    tmpfs would keep the memory it is meant to free)."""
    return os.path.join(jupyter_data_dir(), "supermachine-kernel", "suspended")


def _process_start(pid: int) -> Optional[str]:
    """Start time of host process `pid` in clock ticks (from /proc), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def sweep(root: str) -> list[str]:
    """Removes the suspend snapshots of kernel processes that are gone (killed before they could
    clean up); returns the paths removed."""
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")  # PID-START-SERIAL
        if len(parts) != 3 or not all(p.isdigit() for p in parts) or \
                _process_start(int(parts[0])) == parts[1]:
            continue
        path = os.path.join(root, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def cpu_ticks(stat: bytes) -> tuple[int, int]:
    """(busy, total) clock ticks from the first line of a /proc/stat."""
    fields = stat.split(b"\n", 1)[0].split()
    if not fields or fields[0] != b"cpu":
        raise ValueError("not a /proc/stat")
    values = [int(v) for v in fields[1:9]] + [0] * max(0, 8 - len(fields[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


@dataclass
class Suspended:
    """A suspended guest: its snapshot and the REPL process to re-attach to."""

    path: str
    repl_id: int
    where: str
    took_s: float
    size_bytes: int
    kind: str = "full"  # "incremental" (against the VM's base snapshot) or "full"
    #: An incremental snapshot's base memory file, held open while suspended: `image prune`
    #: and `image rm` leave alone what a process has open.
    base_fd: Optional[int] = None

    def discard(self) -> None:
        """Removes the snapshot and lets go of its base."""
        fd, self.base_fd = self.base_fd, None
        if fd is not None:
            os.close(fd)
        shutil.rmtree(self.path, ignore_errors=True)


def start_idle_suspend(kernel: Any) -> Optional["IdleSuspender"]:
    """The kernel's idle suspend, started, if its configuration asks for it
    (`idle_suspend_after` > 0) and its guest runs in microVMs; else None."""
    after = float(getattr(kernel, "idle_suspend_after", 0) or 0)
    guest = kernel.guest
    if after <= 0 or guest is None or getattr(guest.backend, "name", "") != "vm":
        return None
    suspender = IdleSuspender(kernel, guest, after, logger=getattr(kernel, "log", None))
    guest.gate = suspender
    suspender.start()
    atexit.register(suspender.stop)
    return suspender


class IdleSuspender:
    """One per kernel (when idle_suspend_after > 0 and the guest runs in microVMs). It is the
    `GuestRepl`'s gate: the client calls `touch()` on every request and guest event and awaits
    `before_use()` before it talks to the guest."""

    def __init__(self, kernel: Any, guest: Any, after: float, root: Optional[str] = None,
                 logger: Any = None) -> None:
        self.kernel = kernel
        self.guest = guest
        self.after = float(after)
        self.period = min(max(self.after / 4, 0.25), MAX_PERIOD)
        self.root = root or default_root()
        self.log = logger or log
        self.last_activity = time.monotonic()
        self.suspends = 0
        self.resumes = 0
        self.last_suspend_s: Optional[float] = None
        self.last_resume_s: Optional[float] = None
        self._state: Optional[Suspended] = None
        #: A failed resume not yet reported by an execute request: (reason, its msg_id once one
        #: reported it; every guest call of that request fails the same way).
        self._failed: Optional[tuple[str, Optional[str]]] = None
        self._suspending = False
        self._lock = asyncio.Lock()
        self._sample: Optional[tuple[float, int, int]] = None
        self._serial = itertools.count(1)
        self._task: Optional[asyncio.Task] = None
        self._resumed: Optional[tuple[int, float, str]] = None  # id(vm), wall time, how
        self.last_kind: Optional[str] = None
        self.last_size: Optional[int] = None
        self._slot_released = False  # the limits' VM slot was given back at the suspend

    # -- the gate GuestRepl calls ----------------------------------------------------------------

    @property
    def suspended(self) -> bool:
        """True while the guest is suspended to disk (or being suspended)."""
        return self._state is not None or self._suspending

    def touch(self) -> None:
        """Activity: a request or guest output. Thread-safe (one float store)."""
        self.last_activity = time.monotonic()

    async def before_use(self) -> None:
        """Awaited before every request to the guest: resumes it if it is suspended."""
        self.touch()
        if self._failed is not None:
            self._report_failure()
        if self._state is None and not self._lock.locked():
            return
        async with self._lock:
            self.touch()
            if self._state is not None:
                await self._resume(self._state)
                if self._failed is not None:
                    self._report_failure()

    def _report_failure(self) -> None:
        """Raises GuestDied for a failed resume within the first execute request after it
        (whatever request found it), so its cell says so; other requests get the fresh VM."""
        assert self._failed is not None
        reason, reported_in = self._failed
        parent = self.kernel.get_parent("shell") or {}
        header = parent.get("header") or {}
        if header.get("msg_type") != "execute_request":
            return
        msg_id = header.get("msg_id")
        if reported_in is None:
            self._failed = (reason, msg_id)
        elif reported_in != msg_id:
            self._failed = None
            return
        raise GuestDied(reason)

    def resume_soon(self) -> None:
        """A frontend (re)connected (kernel_info_request): a request is likely to follow, so a
        suspended guest is resumed now, in the background. Thread-safe. A failure is kept for
        the next cell to report."""
        if self._state is not None:
            self.guest.loop.call_soon_threadsafe(
                lambda: self.guest.loop.create_task(self._resume_ahead()))

    async def _resume_ahead(self) -> None:
        async with self._lock:
            if self._state is not None:
                try:
                    await self._resume(self._state)
                except GuestUnavailable as e:  # over a limit: the next request tries again
                    self.log.warning("%s", e)

    def superseded(self) -> None:
        """Another guest was adopted (%restore): a suspend snapshot is not needed any more."""
        state, self._state = self._state, None
        if state is not None:
            state.discard()

    # -- facts (%vm) ------------------------------------------------------------------------------

    def resumed_origin(self, vm: Any) -> Optional[tuple[float, str]]:
        """(wall time, how) if `vm` is the one the last resume restored, else None."""
        resumed = self._resumed
        if resumed is None or resumed[0] != id(vm):
            return None
        return resumed[1], resumed[2]

    def describe(self) -> str:
        """One line for %vm: the setting and what happened so far."""
        text = f"after {self.after:g} s idle (c.MicroVMKernel.idle_suspend_after)"
        if self.suspends:
            text += f"; suspended {self.suspends}x"
            if self.last_suspend_s is not None:
                text += f" (last snapshot {self.last_kind or 'full'}, " \
                        f"{(self.last_size or 0) / 2**20:.1f} MiB, {self.last_suspend_s:.2f} s)"
            if self.last_resume_s is not None:
                text += f", last resume {self.last_resume_s:.2f} s"
        return text

    # -- the watch -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts watching for idleness (on the guest's loop) and removes snapshots left by
        kernel processes that were killed."""
        removed = sweep(self.root)
        if removed:
            self.log.info("removed %d suspend snapshots of kernels that are gone", len(removed))
        self._task = self.guest.loop.create_task(self._watch())

    def stop(self) -> None:
        """Stops watching and removes this kernel's suspend snapshot (the process is ending)."""
        if self._task is not None:
            self._task.cancel()
        state, self._state = self._state, None
        if state is not None:
            state.discard()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed check must not end the watch
                self.log.exception("idle check failed")

    def quiet(self) -> bool:
        """No request or output for long enough (the last CPU sample window is then due), none
        pending, and nothing that a suspend would break."""
        if self.suspended or self._lock.locked():
            return False
        if time.monotonic() - self.last_activity < self.after - self.period:
            return False
        guest = self.guest
        if guest.busy or guest.handle is None or getattr(self.kernel, "in_request", False):
            return False
        return not self._exposed() and not self._connected()

    def _connected(self) -> bool:
        """Connections through the kernel's egress proxy are open (kernel/network.py)."""
        proxy = getattr(getattr(self.kernel, "network", None), "proxy", None)
        return bool(getattr(proxy, "active_connections", 0))  # a property of _core.NetProxy

    def _exposed(self) -> bool:
        host = getattr(self.kernel, "host_magics", None)
        exposures = getattr(host, "exposures", None)
        ports = getattr(exposures, "by_port", {}) or {}
        return any(getattr(x, "listening", False) for x in ports.values())

    async def check(self) -> bool:
        """One idle check; suspends the guest if it is idle. Returns True if it suspended."""
        if not self.quiet():
            self._sample = None
            return False
        handle = self.guest.handle
        try:
            stat = await asyncio.to_thread(handle.vm.read_file, "/proc/stat")
            busy, total = cpu_ticks(stat)
        except Exception as e:  # noqa: BLE001 - a guest that cannot answer is not suspended
            self.log.debug("idle check: reading the guest's CPU time failed: %s", e)
            self._sample = None
            return False
        now = time.monotonic()
        previous, self._sample = self._sample, (now, busy, total)
        if previous is None or previous[0] < self.last_activity:
            return False  # the window must lie wholly inside the idle time
        if now - self.last_activity < self.after:
            return False
        share = (busy - previous[1]) / max(1, total - previous[2])
        if share >= CPU_QUIET:
            self.log.debug("idle check: the guest's CPU was %.0f%% busy; not suspending",
                           share * 100)
            return False
        if not self.quiet():
            return False
        try:
            await self.suspend()
        except IdleError as e:
            # E.g. a full disk: the VM runs on; try again after another idle period, not at
            # every check.
            self.log.warning("idle suspend skipped: %s", e)
            self.touch()
            return False
        return True

    # -- suspend ---------------------------------------------------------------------------------

    async def suspend(self) -> Suspended:
        """Snapshots the running guest's VM and releases it (and the VMs kept ahead)."""
        async with self._lock:
            handle = self.guest.handle
            if handle is None or self.guest.busy:
                raise IdleError("the guest is busy or not running")
            self._suspending = True
            try:
                return await self._suspend(handle)
            finally:
                self._suspending = False

    async def _suspend(self, handle: Any) -> Suspended:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)  # guest memory: its owner's alone, even if found open
        path = os.path.join(self.root, f"{os.getpid()}-{_process_start(os.getpid())}-"
                                       f"{next(self._serial)}")
        repl_id = int(handle.child.id)
        qemu_pid = getattr(handle.vm, "qemu_pid", None)
        t0 = time.monotonic()
        idle_for = t0 - self.last_activity
        try:
            kind = await asyncio.to_thread(self._snapshot, handle.vm, path)
        except Exception as e:  # noqa: BLE001 - SnapshotError, VmDiedError, OSError
            shutil.rmtree(path, ignore_errors=True)
            raise IdleError(f"snapshotting the idle VM failed: {e}") from e
        took = time.monotonic() - t0
        size = disk_usage(path)
        self._state = Suspended(path, repl_id, handle.describe(), took, size, kind,
                                _open_base(path) if kind == "incremental" else None)
        await asyncio.to_thread(self._release_ahead)
        await self.guest.stop_guest()
        if limits.active():
            from ..limits.kernel import current  # noqa: PLC0415 - only on limited hosts
            self._slot_released = current().suspend()
        self.suspends += 1
        self.last_suspend_s = took
        self.last_kind, self.last_size = kind, size
        self.log.info("guest idle for %.0f s: suspended (%s VM snapshot %.3f s, %.1f MiB on "
                      "disk; QEMU %s stopped%s)", idle_for, kind, took, size / 2**20, qemu_pid,
                      "; VM slot released" if self._slot_released else "")
        return self._state

    def _snapshot(self, vm: Any, path: str) -> str:
        """Blocking: the incremental snapshot if the VM has a usable base, else the full one;
        returns which."""
        from .._core import SnapshotError  # noqa: PLC0415 - the compiled runtime, loaded by now

        if os.environ.get("SUPERMACHINE_IDLE_SNAPSHOT", "").strip().lower() != "full":
            try:
                vm.snapshot_incremental(path)
                return "incremental"
            except SnapshotError as e:  # no usable base: the VM runs on
                shutil.rmtree(path, ignore_errors=True)
                self.log.info("idle suspend takes a full snapshot: %s", e)
        vm.snapshot(path)
        return "full"

    def _release_ahead(self) -> None:
        """The VMs kept ahead for this kernel go too: the pool's warm VMs, a %restore standby."""
        shrink = getattr(self.guest.backend, "shrink", None)
        if shrink is not None:
            shrink()
        host = getattr(self.kernel, "host_magics", None)
        if host is not None:
            host.machine().drop_standby()

    # -- resume ----------------------------------------------------------------------------------

    async def _resume(self, state: Suspended) -> None:
        t0 = time.monotonic()
        if self._slot_released:
            from ..limits.accounting import LimitExceeded  # noqa: PLC0415
            from ..limits.kernel import current  # noqa: PLC0415
            try:
                await asyncio.to_thread(current().resume)
            except LimitExceeded as e:  # the snapshot stays: the next request tries again
                raise GuestUnavailable(f"this kernel's VM is suspended and cannot resume now: "
                                       f"{e}") from None
            self._slot_released = False
        try:
            handle = await asyncio.to_thread(self._restore, state)
            t1 = time.monotonic()
            self._state = None  # from here on the adopted guest is the kernel's
            await self.guest.adopt(handle, timeout=RESUME_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - any failure: a fresh VM, and say so
            self._state = None
            state.discard()
            self.log.error("resuming the idle-suspended guest from %s failed: %s", state.path, e)
            reason = f"it was suspended while idle, and resuming it failed ({e})"
            self._failed = (reason, None)
            self.guest.start()
            self.guest.on_event("died", {"reason": reason}, [])  # told at once outside a cell
            return
        self._state = None
        self.touch()  # idle time counts from the resume
        # The restored QEMU maps the memory file (and the base's): their names are not needed
        # any more.
        state.discard()
        self.resumes += 1
        self.last_resume_s = time.monotonic() - t0
        self._resumed = (id(handle.vm), time.time(),
                         f"resumed after an idle suspend ({self.last_resume_s:.2f} s)")
        self.log.info("resumed the idle-suspended guest in %.3f s (VM restored and REPL "
                      "attached %.3f s, REPL answered %.3f s)", self.last_resume_s, t1 - t0,
                      self.last_resume_s - (t1 - t0))

    def _restore(self, state: Suspended) -> VmHandle:
        """Blocking: verify and restore the snapshot, re-attach to its REPL."""
        from .. import api  # noqa: PLC0415 - the compiled runtime, loaded by now anyway

        if not os.path.isdir(state.path):
            raise IdleError(f"its snapshot {state.path} is gone")
        image = api.Image.from_snapshot(state.path)
        vm = image.boot()
        try:
            child = attach_repl(vm, state.repl_id)
        except BaseException:
            vm.release()
            raise
        handle = VmHandle(vm, child, vm.release, f"{describe_vm(vm)}, resumed after idle")
        handle.prestarted = True
        return handle


def _open_base(path: str) -> Optional[int]:
    """A read-only descriptor of incremental snapshot ``path``'s base memory file, or None."""
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            base = json.load(f)["base"]["dir"]
        return os.open(os.path.join(base, "memory"), os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def disk_usage(path: str) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks: sparse files count what
    they hold). A file also linked from elsewhere (an incremental snapshot's pin of its base's
    memory file, while the base exists) is that other place's and not counted."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_nlink == 1:
                total += st.st_blocks * 512
    return total
