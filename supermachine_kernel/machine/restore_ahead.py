"""Restore-ahead: one paused, warm VM per kernel, restored from the snapshot `%restore` will
most likely ask for next (the one just taken, or the one just restored).

A restore costs a QEMU start, loading the device state and — the largest part under TCG — the
guest running cold (QEMU's translated-code cache starts empty in every new process). The
standby pays all of that in the background: it restores the snapshot, re-attaches to its REPL
and says hello (so the REPL's restore path has run once), then freezes the VM (`Vm.pause`: the
agent goes quiet and the vCPUs stop; the guest has then run a fraction of a second past the
snapshot, as any restored guest does before its first cell, and uses no CPU while it waits). `%restore` of that snapshot then only resumes it (`Vm.resume`: a new Hello sets the guest
clock, reseeds its RNG and bumps the generation, exactly as a restore does) and adopts it.

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
from typing import Any, Callable, Optional

from .. import env_switch

WARM_SECONDS = 0.2  # the REPL runs its after-restore warm-up steps; keep the drift short
READY_TIMEOUT = 120.0


def enabled() -> bool:
    return env_switch(os.environ, "SUPERMACHINE_RESTORE_AHEAD")


def files_stamp(path: str) -> str:
    """What changes when a snapshot directory's files are rewritten or damaged (the runtime's
    stamp: inode, size and mtime of each file)."""
    from .. import _core  # noqa: PLC0415 - standbys exist only with the compiled runtime

    return _core.snapshot_files_stamp(path)


class Standby:
    """One VM restored ahead of time from snapshot ``name`` (see the module doc)."""

    def __init__(self, name: str, path: str, restore: Callable[[], tuple[Any, Any]],
                 log: logging.Logger) -> None:
        self.name = name
        self.path = path
        self.stamp = files_stamp(path)
        self._restore = restore
        self._log = log
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._vm: Any = None
        self._child: Any = None
        self._paused = False
        self._taken = False
        self._dropped = False
        self.error: Optional[BaseException] = None
        threading.Thread(target=self._run, name=f"standby-{name}", daemon=True).start()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            vm, child = self._restore()
        except BaseException as e:  # noqa: BLE001 - reported by take(): the normal path runs
            self.error = e
            self._log.info("restore-ahead of %s failed: %s", self.name, e)
            self._ready.set()
            return
        with self._lock:
            self._vm, self._child = vm, child
            dropped = self._dropped
        self._ready.set()
        if dropped:
            vm.release()
            return
        self._log.info("restore-ahead of %s ready in %.3f s", self.name, time.monotonic() - t0)
        self._wake.wait(WARM_SECONDS)
        with self._lock:
            if self._taken or self._dropped:
                return
            try:
                vm.pause()
                self._paused = True
            except Exception as e:  # noqa: BLE001 - a VM that cannot pause is not kept
                self.error = e
                self._dropped = True
        if self.error is not None:
            vm.release()

    def take(self, timeout: float = READY_TIMEOUT) -> Optional[tuple[Any, Any]]:
        """(vm, repl child) running and resynchronised, or None (use the normal path)."""
        if files_stamp(self.path) != self.stamp:
            self.drop()
            return None
        if not self._ready.wait(timeout):
            self.drop()
            return None
        with self._lock:
            if self._dropped or self._taken or self._vm is None:
                return None
            self._taken = True
            paused = self._paused
        self._wake.set()
        vm = self._vm
        try:
            if paused:
                vm.resume()
            if not vm.alive:
                raise RuntimeError("the standby VM died while waiting")
        except Exception as e:  # noqa: BLE001
            self._log.info("restore-ahead VM for %s unusable: %s", self.name, e)
            vm.release()
            return None
        return vm, self._child

    def drop(self) -> None:
        """Releases the standby (now, or as soon as its restore finishes)."""
        with self._lock:
            if self._taken or self._dropped:
                return
            self._dropped = True
            vm = self._vm
        self._wake.set()
        if vm is not None:
            threading.Thread(target=vm.release, name="standby-release", daemon=True).start()


class RestoreAhead:
    """Keeps at most one :class:`Standby` per kernel."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._current: Optional[Standby] = None
        self._lock = threading.Lock()

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
