"""Restore-ahead: one paused, warm VM per kernel (`Standby`), restored from the notebook
snapshot `%restore` will most likely ask for next (the one just taken, or the one just restored).

A restore costs a QEMU start, loading the device state and — the largest part under TCG — the
guest running cold (QEMU's translated-code cache starts empty in every new process). The
standby pays all of that in the background (a `Prepared`, prepared.py): it restores the
snapshot, re-attaches to its REPL and says hello (so the REPL's restore path has run once),
then freezes the VM (`Vm.pause`: the agent goes quiet and the vCPUs stop; the guest has then
run a fraction of a second past the snapshot, as any restored guest does before its first
cell, and uses no CPU while it waits). `%restore` of that snapshot then only resumes it
(`Vm.resume`: a new Hello sets the guest clock, reseeds its RNG and bumps the generation,
exactly as a restore does) and adopts it.

The standby is only used while the snapshot's files are unchanged (same inode, size, mtime as
when it was restored); otherwise it is released and `%restore` takes the verified path, so a
damaged or replaced snapshot is still reported. Costs one idle VM's memory; set
SUPERMACHINE_RESTORE_AHEAD=0 to turn it off.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Optional

from .. import env_switch
from ..prepared import Prepared

WARM_SECONDS = 0.2  # the REPL runs its after-restore warm-up steps; keep the drift short
READY_TIMEOUT = 120.0


def enabled() -> bool:
    return env_switch(os.environ, "SUPERMACHINE_RESTORE_AHEAD")


def files_stamp(path: str) -> str:
    """What changes when a snapshot directory's files are rewritten or damaged (the runtime's
    stamp: inode, size and mtime of each file)."""
    # The compiled runtime is loaded on first use: the local backend imports this module too.
    from .. import api  # noqa: PLC0415

    return api.snapshot_files_stamp(path)


class Standby:
    """One VM restored ahead of time from notebook snapshot ``name`` (see the module doc)."""

    def __init__(self, name: str, path: str, restore: Callable[[], tuple[Any, Any]],
                 log: logging.Logger) -> None:
        self.name = name
        self.path = path
        self.stamp = files_stamp(path)
        self._restore = restore
        self._log = log
        self._wake = threading.Event()  # set by take() and drop(): do not pause (any more)
        self._prepared = Prepared(self._restore_and_pause, self._release,
                                  name=f"standby-{name}")

    def _restore_and_pause(self) -> tuple[Any, Any, bool]:
        """(vm, REPL child, paused): restored and greeted, then paused after WARM_SECONDS
        unless it was asked for (or dropped) meanwhile."""
        t0 = time.monotonic()
        try:
            vm, child = self._restore()
        except BaseException as e:
            self._log.info("restore-ahead of %s failed: %s", self.name, e)
            raise
        self._log.info("restore-ahead of %s ready in %.3f s", self.name, time.monotonic() - t0)
        if self._wake.wait(WARM_SECONDS):
            return vm, child, False
        try:
            vm.pause()
        except BaseException:  # a VM that cannot pause is not kept
            vm.release()
            raise
        return vm, child, True

    @property
    def error(self) -> Optional[BaseException]:
        return self._prepared.error

    def take(self, timeout: float = READY_TIMEOUT) -> Optional[tuple[Any, Any]]:
        """(vm, repl child) running and resynchronised, or None (use the normal path)."""
        if files_stamp(self.path) != self.stamp:
            self.drop()
            return None
        self._wake.set()
        taken = self._prepared.claim(timeout)
        if taken is None:
            return None
        vm, child, paused = taken
        try:
            if paused:
                vm.resume()
            if not vm.alive:
                raise RuntimeError("the standby VM died while waiting")
        except Exception as e:  # noqa: BLE001
            self._log.info("restore-ahead VM for %s unusable: %s", self.name, e)
            vm.release()
            return None
        return vm, child

    def drop(self) -> None:
        """Releases the standby (now, or as soon as its restore finishes)."""
        self._wake.set()
        self._prepared.release()

    def _release(self, standby: tuple[Any, Any, bool]) -> None:
        # On a thread of its own: releasing a VM waits for QEMU to exit, and drop() is called
        # from the kernel's event loop (%snapshot --delete, a new snapshot replacing this one).
        threading.Thread(target=standby[0].release, name="standby-release", daemon=True).start()


class RestoreAhead:
    """Keeps at most one :class:`Standby` per kernel.

    At the process's end the standby is only dropped, not waited for: a restore in flight can
    take longer than Jupyter waits for a kernel to stop (it SIGKILLs it after 5 s). Its QEMU
    dies with the process, and the runtime removes its work dir
    (`api.remove_work_dirs_at_exit`, called last by the kernel's exit paths, kernel/lifecycle.py)."""

    live: "weakref.WeakSet[RestoreAhead]" = weakref.WeakSet()  # for `forget_all`

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._current: Optional[Standby] = None
        self._lock = threading.Lock()
        RestoreAhead.live.add(self)

    def prepare(self, name: str, path: str, restore: Callable[[], tuple[Any, Any]]) -> None:
        """Start ``restore()`` of snapshot ``name`` at ``path`` ahead: it returns (vm, REPL
        child) with the REPL already greeted. Replaces any other standby."""
        if not enabled():
            return
        with self._lock:
            old, self._current = self._current, Standby(name, path, restore, self._log)
        if old is not None:
            old.drop()

    def take(self, name: str) -> Optional[tuple[Any, Any]]:
        """The standby for ``name`` if there is a usable one (it is then used up)."""
        with self._lock:
            current = self._current
            if current is None or current.name != name:
                return None
            self._current = None
        return current.take()

    def forget(self, name: Optional[str] = None) -> None:
        """Drop the standby (of ``name`` only, when given): deleted or replaced snapshot."""
        with self._lock:
            current = self._current
            if current is None or (name is not None and current.name != name):
                return
            self._current = None
        current.drop()


def forget_all() -> None:
    """The process is ending: every kernel's standby is dropped (see `RestoreAhead`)."""
    for ahead in list(RestoreAhead.live):
        ahead.forget()
