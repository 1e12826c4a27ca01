"""Restore-ahead's standby (machine/restore_ahead.py) when it is dropped: at once from the
kernel's event loop, its release on a thread, and a restore still in flight released when it
returns. At the process's end nothing waits for it: the runtime removes the work dir of every
VM the process still has (`api.remove_work_dirs_at_exit`); tests/machine/test_exit_work_dirs.py
checks that with real VMs and tests/faults/test_soak_findings.py through a kernel. A fake VM
stands in for QEMU here."""
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


def test_forget_does_not_wait(ahead, tmp_path) -> None:
    vm = SlowVm()
    vm.gate.clear()  # QEMU "does not exit" until the test says so
    ahead.prepare("s1", str(tmp_path), lambda: (vm, object()))
    time.sleep(0.5)
    t0 = time.monotonic()
    ahead.forget()  # from the kernel's event loop: the release goes to a thread
    assert time.monotonic() - t0 < 0.2
    assert not vm.released.is_set()
    vm.gate.set()
    assert vm.released.wait(10)


def test_a_restore_in_flight_is_released_when_it_returns(ahead, tmp_path) -> None:
    vm = SlowVm()
    go = threading.Event()

    def restore():
        go.wait(10)
        return vm, object()

    ahead.prepare("s1", str(tmp_path), restore)
    t0 = time.monotonic()
    ahead.forget()
    assert time.monotonic() - t0 < 0.2, "forget waited for the restore"
    assert ahead.take("s1") is None
    go.set()
    assert vm.released.wait(10), "the VM restored after the standby was dropped was leaked"


def test_a_replaced_standby_is_released(ahead, tmp_path) -> None:
    first, second = SlowVm(), SlowVm()
    ahead.prepare("s1", str(tmp_path), lambda: (first, object()))
    time.sleep(0.5)
    ahead.prepare("s2", str(tmp_path), lambda: (second, object()))  # drops the first
    assert first.released.wait(10)
    assert not second.released.is_set()
    taken = ahead.take("s2")
    assert taken is not None and taken[0] is second


def test_forget_all_drops_every_kernels_standby(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SUPERMACHINE_RESTORE_AHEAD", "1")
    kernels = [RestoreAhead(logging.getLogger("test")) for _ in range(2)]
    vms = [SlowVm(), SlowVm()]
    for a, vm in zip(kernels, vms):
        a.prepare("s1", str(tmp_path), lambda vm=vm: (vm, object()))
    restore_ahead.forget_all()
    assert all(vm.released.wait(10) for vm in vms)
    assert all(a.take("s1") is None for a in kernels)
