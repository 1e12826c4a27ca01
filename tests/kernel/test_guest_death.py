"""When the guest dies, the running cell says so, a fresh guest starts and the next cell works."""
from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from .harness import BACKEND, KERNEL, SLOW, Kernel


@pytest.fixture
def fresh_kernel():
    k = Kernel(KERNEL)
    yield k
    k.shutdown()


def _guest_victims(k: Kernel) -> list[psutil.Process]:
    """The process whose death kills the guest: QEMU for VMs, the REPL for the local backend."""
    kernel_proc = psutil.Process(k.km.provisioner.pid)
    out = []
    for p in kernel_proc.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if BACKEND == "vm" and "qemu" in p.name():
            out.append(p)
        elif BACKEND == "local" and "repl.py" in cmd:
            out.append(p)
    return out


def test_os_exit_in_cell(fresh_kernel):
    k = fresh_kernel
    k.execute("x = 1")
    reply, outputs = k.execute("import os; os._exit(1)", timeout=60)
    assert reply["status"] == "error"
    assert reply["ename"] == "GuestDied"
    assert "exited with code 1" in reply["evalue"]
    errors = [m for m in outputs if m["msg_type"] == "error"]
    assert errors and "died" in errors[0]["content"]["evalue"]
    # fresh guest, state gone, works
    reply, _ = k.execute("x", timeout=120)
    assert reply["ename"] == "NameError"
    assert k.value("1+1") == "2"


def test_guest_killed_from_outside_during_cell(fresh_kernel):
    k = fresh_kernel
    victims = _guest_victims(k)
    assert victims, "could not find the guest process"

    def kill():
        time.sleep(1.0 * SLOW)
        for p in victims:
            p.send_signal(signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    reply, outputs = k.execute("import time; time.sleep(600)", timeout=120)
    assert reply["status"] == "error"
    assert reply["ename"] == "GuestDied"
    assert k.value("'alive again'", timeout=120) == "'alive again'"


def test_guest_killed_while_idle(fresh_kernel):
    k = fresh_kernel
    for p in _guest_victims(k):
        p.send_signal(signal.SIGKILL)
    time.sleep(1.0)
    assert k.value("3*3", timeout=120) == "9"


def test_no_repl_left_after_shutdown():
    k = Kernel(KERNEL)
    victims = _guest_victims(k)
    assert victims
    k.shutdown()
    gone, alive = psutil.wait_procs(victims, timeout=15)
    assert not alive, alive


@pytest.mark.skipif(BACKEND != "vm", reason="a guest kernel panic needs a VM")
def test_guest_kernel_panic():
    # Guest root panics its kernel through sysrq (the default guest user may not).
    k = Kernel(KERNEL, extra_arguments=["--MicroVMKernel.guest_user=root"])
    try:
        reply, outputs = k.execute("open('/proc/sysrq-trigger', 'w').write('c')", timeout=120)
        assert reply["status"] == "error"
        assert reply["ename"] == "GuestDied"
        assert k.value("'after panic'", timeout=300) == "'after panic'"
    finally:
        k.shutdown()
