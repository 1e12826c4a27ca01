"""An idle-suspended kernel gives its VM slot back (machine/idle.py, limits/kernel.py), through
a real kernel (jupyter_client): while it is suspended another VM of the same user fits under
vms_per_user = 1; a resume then fails with the limits' message and keeps the suspend snapshot;
once the other VM is gone, the next cell resumes with the kernel's variables."""
from __future__ import annotations

import os
import tempfile
import time
import uuid

import psutil
import pytest

from supermachine_kernel.limits.accounting import Ledger, LimitExceeded
from supermachine_kernel.limits.config import load

from .conftest import BACKEND, KERNEL, SPECS, Kernel

pytestmark = [pytest.mark.vm, pytest.mark.skipif(BACKEND != "vm", reason="limits are on VMs")]

IDLE = 2.0


def qemu_running(kernel_pid: int) -> bool:
    try:
        procs = psutil.Process(kernel_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    return any(p.name().startswith("qemu-system") and p.status() != psutil.STATUS_ZOMBIE
               for p in procs)


def test_a_suspended_kernel_frees_its_slot_and_a_resume_over_the_limit_waits() -> None:
    with tempfile.TemporaryDirectory(prefix="smk-idle-slot-") as d:
        path = os.path.join(d, "limits.py")
        with open(path, "w") as f:
            f.write(f"c.MicroVMLimits.vms_per_user = 1\n"
                    f"c.MicroVMLimits.state_dir = {os.path.join(d, 'state')!r}\n"
                    f"c.MicroVMLimits.cgroup_name = 'smk-test-{uuid.uuid4().hex[:8]}'\n")
        jupyter_path = os.pathsep.join(p for p in (SPECS, os.environ.get("JUPYTER_PATH")) if p)
        os.environ["JUPYTER_PATH"] = jupyter_path  # the KernelManager finds the spec
        env = dict(os.environ, SUPERMACHINE_LIMITS_FILE=path, JUPYTER_DATA_DIR=d,
                   JUPYTER_PATH=jupyter_path)
        cwd = os.path.join(d, "notebooks")
        os.mkdir(cwd)
        suspended = os.path.join(d, "supermachine-kernel", "suspended")
        limits = load(path)
        assert limits is not None
        k = Kernel(KERNEL, extra_arguments=[f"--MicroVMKernel.idle_suspend_after={IDLE}"],
                   env=env, cwd=cwd)
        other = None
        try:
            assert k.value("x = 41; x", timeout=120) == "41"
            pid = k.km.provisioner.process.pid  # type: ignore[union-attr]
            deadline = time.monotonic() + 300
            while qemu_running(pid) or not os.path.isdir(suspended) or not os.listdir(suspended):
                assert time.monotonic() < deadline, "the kernel did not suspend"
                time.sleep(0.25)
            # Suspended: its slot is free, so this user's other VM (here taken by hand, as
            # another kernel would) fits under vms_per_user = 1.
            other = Ledger(limits).acquire(256, "another kernel")
            reply, outputs = k.execute("x + 1", timeout=120)
            assert reply["status"] == "error", reply
            assert reply["ename"] == "GuestUnavailable", reply
            assert "VM limit reached" in reply["evalue"], reply["evalue"]
            assert "vms_per_user" in reply["evalue"], reply["evalue"]
            assert os.listdir(suspended), "the suspend snapshot went with the refused resume"
            assert not qemu_running(pid)
            other.release()
            other = None
            assert k.value("x + 1", timeout=120) == "42"
            assert os.listdir(suspended) == []
            # Running again, it holds its slot: the other VM no longer fits.
            with pytest.raises(LimitExceeded, match="VM limit reached"):
                Ledger(limits).acquire(256, "another kernel").release()
        finally:
            if other is not None:
                other.release()
            k.shutdown()
