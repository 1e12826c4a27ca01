"""Idle suspend through a real kernel (jupyter_client): the VM of an idle kernel is snapshotted
and its QEMU stopped; the next request resumes it transparently (machine/idle.py).

One kernel for the module, with a short idle time; the tests run in order and each waits for
the kernel to suspend again. Needs the vm backend (a local guest has no VM to suspend).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest
import psutil

from supermachine_kernel.machine.idle import disk_usage

from .harness import BACKEND, KERNEL, SLOW, Kernel, stdout_of

pytestmark = pytest.mark.skipif(BACKEND != "vm", reason="idle suspend needs the vm backend")

IDLE = 2.0  # seconds: c.MicroVMKernel.idle_suspend_after of the test kernel
SUSPEND_TIMEOUT = 120 * SLOW / 8 + 60  # the guest's after-restore warm-up must end first


def qemu_pids(kernel_pid: int) -> list[int]:
    """The live QEMU processes under the kernel process (a killed QEMU its parent has not
    reaped yet does not count)."""
    try:
        procs = psutil.Process(kernel_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in procs:
        try:
            if p.name().startswith("qemu-system") and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def runs(pid: int) -> bool:
    """Process `pid` exists and is not a zombie (a killed QEMU its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class IdleKernel(Kernel):
    def __init__(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="smk-idle-data-")
        super().__init__(KERNEL, extra_arguments=[f"--MicroVMKernel.idle_suspend_after={IDLE}"],
                         env=dict(os.environ, JUPYTER_DATA_DIR=self.data_dir))
        self.pid = self.km.provisioner.process.pid  # type: ignore[union-attr]

    @property
    def suspend_dir(self) -> str:
        return os.path.join(self.data_dir, "supermachine-kernel", "suspended")

    def snapshots(self) -> list[str]:
        try:
            return os.listdir(self.suspend_dir)
        except FileNotFoundError:
            return []

    def wait_suspended(self) -> None:
        deadline = time.monotonic() + SUSPEND_TIMEOUT
        while time.monotonic() < deadline:
            if not qemu_pids(self.pid) and self.snapshots():
                return
            time.sleep(0.25)
        raise AssertionError(f"the kernel did not suspend within {SUSPEND_TIMEOUT:.0f} s "
                             f"(QEMU {qemu_pids(self.pid)}, snapshots {self.snapshots()})")


@pytest.fixture(scope="module")
def idle_kernel():
    k = IdleKernel()
    yield k
    if k.km.is_alive():
        k.shutdown()
    shutil.rmtree(k.data_dir, ignore_errors=True)


def test_a_busy_guest_keeps_its_vm(idle_kernel):
    k = idle_kernel
    reply, _ = k.execute("import threading, time\n"
                         "spin = True\n"
                         "def burn():\n"
                         "    while spin:\n"
                         "        sum(range(10000))\n"
                         "threading.Thread(target=burn, daemon=True).start()")
    assert reply["status"] == "ok", reply
    before = qemu_pids(k.pid)
    assert before
    time.sleep(IDLE * 5)
    assert qemu_pids(k.pid) == before, "a guest computing in the background was suspended"
    # A cell that runs longer than the idle time (its request is pending) keeps it too.
    reply, _ = k.execute(f"spin = False\ntime.sleep({IDLE * 3})")
    assert reply["status"] == "ok", reply
    assert qemu_pids(k.pid) == before


def test_variables_files_and_processes_survive_suspend(idle_kernel):
    k = idle_kernel
    reply, outputs = k.execute(
        "import os, subprocess\n"
        "x = 41\n"
        "open('/home/jovyan/idle.txt', 'w').write('kept')\n"
        "p = subprocess.Popen(['sleep', '100000'])\n"
        "print(os.getpid(), p.pid)")
    assert reply["status"] == "ok", reply
    repl_pid, sleep_pid = stdout_of(outputs).split()
    running = qemu_pids(k.pid)
    before_kib = pss_kib([k.pid, *running])
    k.wait_suspended()
    assert not any(runs(pid) for pid in running), "QEMU still runs"
    after_kib = pss_kib([k.pid])
    assert after_kib < before_kib, (before_kib, after_kib)
    snapshot = os.path.join(k.suspend_dir, k.snapshots()[0])
    assert os.stat(k.suspend_dir).st_mode & 0o077 == 0, "suspend snapshots must be private"
    # Incremental: only the pages that differ from the warm snapshot the VM came from, a
    # fraction of what a full snapshot holds (the base's memory file and more).
    with open(os.path.join(snapshot, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "incremental", meta
    base_memory = os.stat(os.path.join(meta["base"]["dir"], "memory")).st_blocks * 512
    assert disk_usage(snapshot) < base_memory / 3, (disk_usage(snapshot), base_memory)
    # The kernel holds the base open while suspended (image prune/rm skip what is open).
    held = {os.path.realpath(f"/proc/{k.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{k.pid}/fd")}
    assert os.path.realpath(os.path.join(meta["base"]["dir"], "memory")) in held
    assert k.value("x + 1") == "42"
    assert not os.path.exists(snapshot), "the suspend snapshot outlived the resume"
    assert qemu_pids(k.pid), "no QEMU after the resume"
    assert k.value("open('/home/jovyan/idle.txt').read()") == "'kept'"
    assert k.value("p.poll(), os.getpid(), p.pid") == f"(None, {repl_pid}, {sleep_pid})"
    reply, outputs = k.execute("%vm", timeout=60)
    assert reply["status"] == "ok", reply
    facts = stdout_of(outputs)
    assert "resumed after an idle suspend" in facts, facts
    assert f"after {IDLE:g} s idle" in facts and "suspended 1x" in facts, facts
    assert "last snapshot incremental" in facts, facts


def test_interrupt_and_complete_while_suspended(idle_kernel):
    k = idle_kernel
    k.wait_suspended()
    k.km.interrupt_kernel()  # message mode: an interrupt_request on the control channel
    time.sleep(1)
    assert not qemu_pids(k.pid), "an interrupt resumed the suspended VM"
    assert k.snapshots()
    msg_id = k.kc.complete("imp")
    reply = k.reply(msg_id, timeout=60)
    assert reply["status"] == "ok", reply
    assert "import" in reply["matches"]
    assert qemu_pids(k.pid), "the completion did not resume the VM"
    assert k.value("x") == "41"


def test_a_guest_death_after_a_resume_gets_a_fresh_vm(idle_kernel):
    """The suspend gave the pool back; a VM needed later (here after a death) still comes."""
    k = idle_kernel
    k.wait_suspended()
    assert k.value("x") == "41"  # resumed
    reply, _ = k.execute("import os; os._exit(3)", timeout=60)
    assert reply["status"] == "error" and reply["ename"] == "GuestDied", reply
    assert k.value("21 * 2", timeout=120) == "42"
    reply, _ = k.execute("x")
    assert reply["status"] == "error" and reply["ename"] == "NameError", reply
    reply, _ = k.execute("x = 41")
    assert reply["status"] == "ok", reply


def test_kernel_info_resumes_in_the_background(idle_kernel):
    k = idle_kernel
    k.wait_suspended()
    msg_id = k.kc.kernel_info()
    reply = k.reply(msg_id, timeout=60)
    assert reply["status"] == "ok", reply
    deadline = time.monotonic() + SUSPEND_TIMEOUT
    while (not qemu_pids(k.pid) or k.snapshots()) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert qemu_pids(k.pid) and not k.snapshots(), "kernel_info did not resume the VM"
    assert k.value("x") == "41"


def test_restore_while_suspended_replaces_the_suspended_vm(idle_kernel):
    k = idle_kernel
    reply, _ = k.execute("y = 'snapshotted'", timeout=60)
    assert reply["status"] == "ok", reply
    reply, outputs = k.execute("%snapshot before-idle", timeout=300)
    assert reply["status"] == "ok", (reply, outputs)
    reply, _ = k.execute("y = 'changed'")
    assert reply["status"] == "ok", reply
    k.wait_suspended()  # the %restore standby VM went too: no QEMU at all
    reply, outputs = k.execute("%restore before-idle", timeout=300)
    assert reply["status"] == "ok", (reply, outputs)
    assert k.snapshots() == [], "the suspend snapshot outlived a %restore"
    assert k.value("y") == "'snapshotted'"


def test_a_suspended_kernel_survives_the_deletion_of_its_base(idle_kernel):
    """After %restore the VM maps the notebook snapshot's memory: the suspend snapshot is
    incremental against it and pins it, so deleting that snapshot meanwhile loses nothing."""
    k = idle_kernel
    k.wait_suspended()
    snapshot = os.path.join(k.suspend_dir, k.snapshots()[0])
    with open(os.path.join(snapshot, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "incremental", meta
    base = meta["base"]["dir"]
    assert os.path.basename(base).startswith("before-idle"), base
    assert meta["base"]["pinned"], meta["base"]
    shutil.rmtree(base)
    assert k.value("y") == "'snapshotted'"


def suspend_meta(k: IdleKernel) -> tuple[str, dict]:
    snapshot = os.path.join(k.suspend_dir, k.snapshots()[0])
    with open(os.path.join(snapshot, "metadata.json")) as f:
        return snapshot, json.load(f)


def test_a_vm_without_a_usable_base_is_suspended_in_full(idle_kernel):
    """The VM now runs over the pinned copy of a deleted base: no base to be incremental
    against, so the suspend snapshot is the full one, and the resume works the same."""
    k = idle_kernel
    k.wait_suspended()
    _, meta = suspend_meta(k)
    assert meta["kind"] == "template" and "base" not in meta, meta  # RAM in its memory file
    assert k.value("y") == "'snapshotted'"


def test_a_base_gone_without_its_pin_fails_the_resume_clearly(idle_kernel):
    k = idle_kernel
    reply, outputs = k.execute("%snapshot base-two", timeout=300)
    assert reply["status"] == "ok", (reply, outputs)
    reply, outputs = k.execute("%restore base-two", timeout=300)
    assert reply["status"] == "ok", (reply, outputs)
    k.wait_suspended()
    snapshot, meta = suspend_meta(k)
    assert meta["kind"] == "incremental" and meta["base"]["pinned"], meta
    os.unlink(os.path.join(snapshot, "base-memory"))  # as if the link had not been allowed
    shutil.rmtree(meta["base"]["dir"])
    reply, outputs = k.execute("y")
    assert reply["status"] == "error" and reply["ename"] == "GuestDied", reply
    assert "its base snapshot" in reply["evalue"] and "is gone" in reply["evalue"], reply
    assert k.value("1 + 1") == "2"  # a fresh VM
    reply, _ = k.execute("x = 41")
    assert reply["status"] == "ok", reply


def test_a_failed_resume_says_so_and_gives_a_fresh_vm(idle_kernel):
    k = idle_kernel
    k.wait_suspended()
    for name in k.snapshots():
        shutil.rmtree(os.path.join(k.suspend_dir, name))
    reply, outputs = k.execute("x")
    assert reply["status"] == "error"
    assert reply["ename"] == "GuestDied"
    assert "suspended while idle, and resuming it failed" in reply["evalue"]
    assert any(m["msg_type"] == "error" for m in outputs)
    assert k.value("1 + 1") == "2"
    reply, _ = k.execute("x")
    assert reply["status"] == "error" and reply["ename"] == "NameError", reply


def test_shutdown_while_suspended_removes_the_snapshot(idle_kernel):
    k = idle_kernel
    k.wait_suspended()
    k.shutdown()
    assert not k.km.is_alive()
    assert k.snapshots() == [], "a kernel shut down while suspended left its snapshot"
