"""Restore-ahead's standby at the process's exit (machine/restore_ahead.py): the Machine's exit
function drops the standby (`forget`, its release goes to a thread), then RestoreAhead's own
exit function, `wait_released`, waits for that release, so the exit (os._exit after the exit
functions) does not cut it off and leave the VM's work dir behind (found by bench/soak.py). A
fake VM stands in for QEMU; the kernel-level check is in tests/faults/test_soak_findings.py."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from supermachine_kernel.machine import restore_ahead
from supermachine_kernel.machine.restore_ahead import RestoreAhead


class SlowVm:
    """Releases like a VM does: it waits for its QEMU to exit (here: 0.3 s, and `gate`)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.alive = True

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def release(self) -> None:
        time.sleep(0.3)
        self.gate.wait(10)
        self.alive = False
        self.released.set()


@pytest.fixture
def ahead(monkeypatch) -> RestoreAhead:
    monkeypatch.setenv("SUPERMACHINE_RESTORE_AHEAD", "1")
    return RestoreAhead(logging.getLogger("test"))


def test_wait_released_is_an_exit_function(monkeypatch) -> None:
    registered = []
    monkeypatch.setattr(restore_ahead.atexit, "register", registered.append)
    ahead = RestoreAhead(logging.getLogger("test"))
    assert registered == [ahead.wait_released]


def test_exit_waits_for_the_standby_release(ahead, tmp_path) -> None:
    vm = SlowVm()
    restored = threading.Event()

    def restore():
        restored.set()
        return vm, object()

    ahead.prepare("s1", str(tmp_path), restore)
    assert restored.wait(10)
    time.sleep(0.5)  # restored and paused: the standby waits for a %restore
    ahead.forget()  # the Machine's exit function
    ahead.wait_released()  # then RestoreAhead's
    assert vm.released.is_set(), "the exit functions returned before the standby VM was released"


def test_exit_waits_for_a_restore_still_running(ahead, tmp_path) -> None:
    vm = SlowVm()
    go = threading.Event()

    def restore():
        go.wait(10)
        return vm, object()

    ahead.prepare("s1", str(tmp_path), restore)
    threading.Timer(0.2, go.set).start()
    ahead.forget()
    ahead.wait_released()
    assert vm.released.is_set(), "a standby whose restore finished at exit was not released"


def test_a_replaced_standby_is_waited_for_too(ahead, tmp_path) -> None:
    first, second = SlowVm(), SlowVm()
    ahead.prepare("s1", str(tmp_path), lambda: (first, object()))
    time.sleep(0.5)
    ahead.prepare("s2", str(tmp_path), lambda: (second, object()))  # drops the first
    time.sleep(0.5)
    ahead.forget()
    ahead.wait_released()
    assert first.released.is_set() and second.released.is_set()


def test_forget_does_not_wait(ahead, tmp_path) -> None:
    ahead.wait_released()  # nothing restored ahead: nothing to wait for
    vm = SlowVm()
    vm.gate.clear()  # QEMU "does not exit" until the test says so
    ahead.prepare("s1", str(tmp_path), lambda: (vm, object()))
    time.sleep(0.5)
    ahead.forget()  # from the kernel's event loop: the release goes to a thread
    assert not vm.released.is_set()
    vm.gate.set()
    assert vm.released.wait(10)
