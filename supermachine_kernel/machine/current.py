"""`Machine`: the kernel's current VM as a whole. It takes notebook snapshots of it into the
store (snapshot_store.py), puts a notebook snapshot's VM in its place, and reports the facts
about it (for %snapshot, %restore, %vm, %pool).

Restore, built on what the runtime offers (``api.Image.from_snapshot`` verifies the snapshot,
``image.boot()`` restores a VM from it) and on repl_client/attach.py (re-attach to the REPL
process by the id recorded when the snapshot was taken): the REPL the kernel talked to then is
still running inside it, with every variable, thread and file. The kernel's `GuestRepl`
adopts that REPL (hello → ready; its agent has already fixed the clock and reseeded the
kernel RNG, and the REPL reseeds Python's ``random`` when it sees the restore generation change)
and releases the VM it had. The kernel process, its sockets and its execution count stay.

Lineage: ``head`` is the snapshot this kernel's state last came from (taken or restored); a new
snapshot records it as its parent.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import os
import time
from typing import Any, Optional

from ..repl_client.attach import NoReplError, attach_repl
from ..repl_client.vm import VmHandle, describe_vm
from .restore_ahead import RestoreAhead
from .snapshot_store import (
    NotebookSnapshot,
    NotebookSnapshots,
    SnapshotStore,
    disk_usage,
    kernel_id,
    notebook_key,
)

log = logging.getLogger("supermachine_kernel.machine.current")

RESTORE_TIMEOUT = 60.0  # seconds for the restored REPL to answer (it is running already)


class MachineError(Exception):
    """Something the user can act on; ``hint`` says what to do next."""

    def __init__(self, message: str, hint: str = "", ename: str = "SnapshotError") -> None:
        super().__init__(message)
        self.hint = hint
        self.ename = ename


def _api() -> Any:
    """The VM API, imported on the first VM operation: the compiled runtime it loads may be
    absent when the kernel runs the local backend, which imports this module too."""
    from .. import api  # noqa: PLC0415 - see the docstring

    return api


def process_uptime(pid: Optional[int]) -> Optional[float]:
    """Seconds since host process ``pid`` started (from /proc), or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime") as f:
            host_up = float(f.read().split()[0])
        return max(0.0, host_up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def process_start_time(pid: Optional[int]) -> Optional[float]:
    """Unix time host process ``pid`` started, or None. From /proc: the boot time plus the
    process's start ticks, so every call answers the same (no drift, unlike now - uptime)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_rss(pid: Optional[int]) -> Optional[int]:
    """Resident memory of host process ``pid`` in bytes (from /proc), or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class Machine:
    """One per kernel: the notebook's snapshot folder and what this kernel did with it."""

    def __init__(self, kernel: Any, store: Optional[SnapshotStore] = None) -> None:
        self.kernel = kernel
        session = getattr(kernel, "session", None)
        session_id = getattr(session, "session", "") or str(os.getpid())
        connection_file = getattr(getattr(kernel, "parent", None), "connection_file", "") or ""
        kid = kernel_id(connection_file, getattr(session, "key", b"") or b"")
        key, label = notebook_key(os.environ, os.getcwd(), kid, session_id)
        self.store = store or SnapshotStore()
        self.snapshots: NotebookSnapshots = self.store.notebook(key, label)
        self.head: Optional[str] = None
        self.restore_ms: collections.deque[float] = collections.deque(maxlen=10)
        self.snapshot_ms: collections.deque[float] = collections.deque(maxlen=10)
        self._since: dict[int, tuple[float, str]] = {}  # id(vm) -> (wall time, how it came)
        self._log = getattr(kernel, "log", None) or log  # the kernel app's log (--log-level)
        self._ahead = RestoreAhead(self._log)  # a paused VM of the likely next %restore
        atexit.register(self._ahead.forget)
        self.last_restore_was_ahead = False

    # -- the running VM --------------------------------------------------------------------------

    def check_backend(self) -> Any:
        """The kernel's `GuestRepl`, if its guest runs in microVMs (else MachineError)."""
        guest = getattr(self.kernel, "guest", None)
        backend = getattr(getattr(guest, "backend", None), "name", "?")
        if backend != "vm":
            raise MachineError(
                f"this kernel runs its guest with the {backend!r} backend (a host process), which "
                "has no VM to snapshot", "Use the vm backend (the default) for these magics.",
                ename="UnsupportedBackend")
        return guest

    def handle(self) -> Any:
        """The current guest handle, if the guest runs in a VM (else MachineError)."""
        handle = self.check_backend().handle
        if handle is None or getattr(handle, "vm", None) is None:
            raise MachineError("the kernel's microVM is not running right now",
                               "Run a cell (a fresh VM starts), then try again.",
                               ename="GuestUnavailable")
        return handle

    async def ready_handle(self) -> Any:
        guest = getattr(self.kernel, "guest", None)
        if guest is not None and getattr(getattr(guest, "backend", None), "name", "") == "vm":
            try:
                await guest.wait_ready(timeout=getattr(self.kernel, "startup_timeout", 180.0))
            except Exception as e:  # noqa: BLE001
                raise MachineError(f"the kernel's microVM is not available: {e}",
                                   ename="GuestUnavailable") from e
        return self.handle()

    def vm_origin(self, vm: Any) -> tuple[Optional[float], str]:
        """(wall-clock time this kernel got ``vm``, how) — None when it came from the pool."""
        idle = getattr(self.kernel, "idle", None)
        resumed = idle.resumed_origin(vm) if idle is not None else None
        if resumed is not None:
            return resumed
        return self._since.get(id(vm), (None, "from the kernel's pool"))

    # -- snapshot --------------------------------------------------------------------------------

    async def snapshot(self, name: str) -> NotebookSnapshot:
        handle = await self.ready_handle()
        # The standby is replaced by this snapshot's anyway: stop it now rather than let its
        # restore compete with the snapshot for the CPU.
        self._ahead.forget()
        path = self.snapshots.reserve(name)
        repl_id = getattr(handle.child, "id", None)
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(handle.vm.snapshot, path)
        except Exception as e:  # noqa: BLE001 - SnapshotError, VmDiedError, OSError
            hint = "The running session is unchanged."
            if "no space left on the disk" in str(e):  # the runtime's disk-full message
                hint += (f" This notebook's snapshots are in {self.snapshots.dir}: `%snapshot "
                         "--report` shows what each group uses, `%snapshot --delete NAME` frees "
                         "space, and JUPYTER_DATA_DIR in the kernel's environment moves the store "
                         "to another disk.")
            raise MachineError(f"taking snapshot {name!r} failed: {e}", hint) from e
        took = time.monotonic() - t0
        self.snapshot_ms.append(took * 1000)
        kind = None
        try:
            with open(os.path.join(path, "metadata.json")) as f:
                kind = json.load(f).get("kind")
        except (OSError, ValueError):
            pass
        entry = NotebookSnapshot(name=name, created=time.time(), size_bytes=disk_usage(path), parent=self.head,
                      repl_id=repl_id, took_s=round(took, 4),
                      execution_count=getattr(self.kernel, "execution_count", None), kind=kind)
        self.snapshots.record(entry)
        self.head = name
        self.restore_ahead(entry)
        return entry

    def restore_ahead(self, entry: NotebookSnapshot) -> None:
        """Restore ``entry`` in the background and keep it paused for a fast %restore."""
        path = self.path(entry)
        self._ahead.prepare(entry.ref, path, lambda: self._restore_vm(path, entry, greet=True))

    def path(self, entry: NotebookSnapshot) -> str:
        """The directory of ``entry``: in this notebook's group, or in ``entry.group``."""
        if entry.group is None:
            return self.snapshots.path(entry.name)
        return self.store.group(entry.group, self.snapshots).path(entry.name)

    def forget_snapshot(self, name: str) -> None:
        """``name`` (a ref: NAME or GROUP/NAME) was deleted or is being replaced: drop what was
        restored ahead from it."""
        self._ahead.forget(name)

    def drop_standby(self) -> None:
        """Release the VM restored ahead, whatever snapshot it holds (idle suspend frees it)."""
        self._ahead.forget()

    # -- restore ---------------------------------------------------------------------------------

    async def restore(self, entry: NotebookSnapshot) -> float:
        """Replaces the guest's VM with one restored from ``entry``; returns seconds taken."""
        guest = self.check_backend()  # a dead guest is fine: it is replaced anyway
        path = self.path(entry)
        t0 = time.monotonic()
        handle = await asyncio.to_thread(self._standby_handle, entry)
        ahead = handle is not None
        if handle is None:
            handle = await asyncio.to_thread(self._restored_handle, path, entry)
        t1 = time.monotonic()
        try:
            await self._adopt(guest, handle, entry)
        except MachineError as e:
            if not ahead:
                raise
            # The VM restored ahead did not make it: restore the snapshot afresh, once.
            self._log.warning("restore-ahead VM of %s failed (%s); restoring it again", entry.ref, e)
            ahead = False
            handle = await asyncio.to_thread(self._restored_handle, path, entry)
            t1 = time.monotonic()
            await self._adopt(guest, handle, entry)
        took = time.monotonic() - t0
        self._log.info("restored %s in %.3f s (VM %s and REPL attached %.3f s, REPL answered "
                 "%.3f s)", entry.ref, took, "resumed from restore-ahead" if ahead else "restored",
                 t1 - t0, took - (t1 - t0))
        self.last_restore_was_ahead = ahead
        self.restore_ahead(entry)  # the same snapshot is the likeliest next %restore
        self.restore_ms.append(took * 1000)
        self._since = {id(handle.vm): (time.time(), f"restored from {entry.ref!r}")}
        self.head = entry.ref
        return took

    @staticmethod
    async def _adopt(guest: Any, handle: Any, entry: NotebookSnapshot) -> None:
        try:
            await guest.adopt(handle, timeout=RESTORE_TIMEOUT)
        except Exception as e:  # noqa: BLE001
            raise MachineError(
                f"the REPL in snapshot {entry.ref!r} did not answer after the restore: {e}",
                "The previous session is still running.") from e

    def _standby_handle(self, entry: NotebookSnapshot) -> Any:
        """The restore-ahead VM of ``entry`` as a guest handle, or None."""
        taken = self._ahead.take(entry.ref)
        if taken is None:
            return None
        return self._handle(*taken, entry)

    def _restored_handle(self, path: str, entry: NotebookSnapshot) -> Any:
        """Blocking: verify, restore, re-attach to the REPL. Runs on a worker thread."""
        return self._handle(*self._restore_vm(path, entry, greet=False), entry)

    @staticmethod
    def _handle(vm: Any, child: Any, entry: NotebookSnapshot) -> VmHandle:
        """The guest handle `GuestRepl.adopt` takes: the REPL is running (`prestarted`), so it
        is greeted on adoption."""
        handle = VmHandle(vm, child, vm.release, f"{describe_vm(vm)}, snapshot {entry.ref}")
        handle.prestarted = True
        return handle

    def _restore_vm(self, path: str, entry: NotebookSnapshot, greet: bool) -> tuple[Any, Any]:
        """(vm, REPL child) restored from ``entry`` at ``path``: its files verified first, then
        its REPL re-attached by the id recorded at snapshot time (attach.py). ``greet``: for
        restore-ahead, the REPL is greeted and its answer read, so its after-restore path has
        run (and been translated by TCG) before the VM is paused."""
        api = _api()
        t0 = time.monotonic()
        try:
            image = api.Image.from_snapshot(path)
        except (api.SnapshotError, OSError, KeyError, ValueError) as e:
            raise MachineError(f"cannot restore {entry.ref!r}: {e}",
                               f"Delete it with %snapshot --delete {entry.ref}.") from e
        t1 = time.monotonic()
        try:
            vm = image.boot()
        except api.VmError as e:
            raise MachineError(f"restoring {entry.ref!r} failed: {e}",
                               "The previous session is still running.") from e
        self._log.info("snapshot %s verified in %.3f s, VM restored in %.3f s", entry.ref, t1 - t0,
                       time.monotonic() - t1)
        # Snapshotting this VM reads all its RAM: have the file's holes cached before that.
        api.prefetch_snapshot_memory(path)
        try:
            child = attach_repl(vm, entry.repl_id, greet=greet,
                                ready_timeout=RESTORE_TIMEOUT if greet else None)
        except NoReplError as e:
            vm.release()
            raise MachineError("the snapshot holds no running REPL to re-attach to",
                               "It was not taken by %snapshot; take a new one.") from e
        except Exception as e:  # noqa: BLE001 - e.g. the recorded REPL process is not running
            vm.release()
            if greet:  # restore-ahead: its failure is logged, %restore then takes this path
                raise
            raise MachineError(f"the REPL of snapshot {entry.ref!r} is not in the restored VM: "
                               f"{e}", "The snapshot is unusable; delete it and take a new "
                               "one.") from e
        except BaseException:
            vm.release()
            raise
        return vm, child

    # -- facts -----------------------------------------------------------------------------------

    def lineage(self) -> list[str]:
        """head, its parent, … (names; a deleted one is marked), ending at the base image."""
        parents = {e.name: e.parent for e in self.snapshots.entries()}
        chain: list[str] = []
        name = self.head
        while name is not None and name not in chain and len(chain) < 50:
            chain.append(name if name in parents or "/" in name else f"{name} (deleted)")
            name = parents.get(name)
        return chain

    def facts(self) -> dict:
        """What %vm prints: accelerator, memory, vcpus, image, uptime, lineage, …"""
        handle = self.handle()
        vm = handle.vm
        out: dict[str, Any] = {"vm": getattr(vm, "id", "?"), "accelerator": getattr(vm, "accel", None)}
        restored_from = getattr(vm, "restored_from", None)
        meta: dict = {}
        if restored_from:
            try:
                meta = _api().snapshot_info(restored_from)
            except Exception:  # noqa: BLE001 - e.g. deleted since
                meta = {}
        machine = meta.get("machine") or {}
        labels = meta.get("labels") or {}
        backend = getattr(self.kernel.guest, "backend", None)
        image = getattr(backend, "image", None)
        out["memory_mib"] = machine.get("memory_mib") or getattr(image, "memory_mib", None)
        out["vcpus"] = machine.get("vcpus") or getattr(image, "vcpus", None)
        out["image"] = labels.get("image") or getattr(image, "name", None)
        out["image_hash"] = labels.get("image_hash") or getattr(image, "hash", None)
        out["base_snapshot"] = getattr(image, "snapshot", None)
        out["restored_from"] = restored_from
        pid = getattr(vm, "qemu_pid", None)
        out["qemu_pid"] = pid
        out["uptime_s"] = process_uptime(pid)
        out["host_rss_bytes"] = process_rss(pid)
        since, how = self.vm_origin(vm)
        out["origin"] = how
        out["origin_time"] = since
        try:
            out["guest_uptime_s"] = float(vm.read_file("/proc/uptime").split()[0])
        except Exception:  # noqa: BLE001
            out["guest_uptime_s"] = None
        try:
            info = dict(line.split(":", 1) for line in
                        vm.read_file("/proc/meminfo").decode().splitlines() if ":" in line)
            out["guest_mem_available_bytes"] = int(info["MemAvailable"].split()[0]) * 1024
        except Exception:  # noqa: BLE001
            out["guest_mem_available_bytes"] = None
        out["lineage"] = self.lineage()
        out["notebook"] = self.snapshots.label
        return out

    def pool(self) -> Any:
        """The kernel's VM pool (api.Pool) or None (local backend, cold boots)."""
        backend = getattr(getattr(self.kernel, "guest", None), "backend", None)
        return getattr(backend, "pool", None)
