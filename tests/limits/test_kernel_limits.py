"""The limits through real kernels (jupyter_client): one user's second kernel is refused past
vms_per_user with a message naming the setting, and starts once the first kernel is SIGKILLed;
the kernel's QEMU runs in the user's cgroup; %vm says how each limit is held; a %snapshot past
the quota is refused and removed."""
from __future__ import annotations

import os
import re
import signal
import tempfile
import uuid

import pytest

from supermachine_kernel.limits.cgroup import HostFacts, plan
from supermachine_kernel.limits.config import MicroVMLimits

from .conftest import BACKEND, KERNEL, SPECS, Kernel, stdout_of

pytestmark = [pytest.mark.vm, pytest.mark.skipif(BACKEND != "vm", reason="limits are on VMs")]


@pytest.fixture(scope="module")
def setup():
    with tempfile.TemporaryDirectory(prefix="smk-limits-") as d:
        name = f"smk-test-{uuid.uuid4().hex[:8]}"
        path = os.path.join(d, "limits.py")
        with open(path, "w") as f:
            f.write(f"c.MicroVMLimits.vms_per_user = 1\n"
                    f"c.MicroVMLimits.memory_per_user = '3G'\n"
                    f"c.MicroVMLimits.cpu_weight = 50\n"
                    f"c.MicroVMLimits.snapshot_quota = '1M'\n"
                    f"c.MicroVMLimits.state_dir = {os.path.join(d, 'state')!r}\n"
                    f"c.MicroVMLimits.cgroup_name = {name!r}\n")
        env = dict(os.environ, SUPERMACHINE_LIMITS_FILE=path, JUPYTER_DATA_DIR=d,
                   JPY_SESSION_NAME="limits.ipynb",
                   JUPYTER_PATH=os.pathsep.join(p for p in (SPECS, os.environ.get("JUPYTER_PATH"))
                                                if p))
        os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # the KernelManager finds the spec
        limits = MicroVMLimits(memory_per_user="3G", cpu_weight=50, cgroup_name=name)
        notebooks = os.path.join(d, "notebooks")  # the kernels' cwd (their workspace): empty
        os.mkdir(notebooks)
        yield env, plan(limits, HostFacts.read(), os.geteuid(), 0), notebooks
        p = plan(limits, HostFacts.read(), os.geteuid(), 0)
        for group in reversed(p.groups):
            try:
                os.rmdir(group)
            except OSError:
                pass


def _rows(out: str) -> dict[str, str]:
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.strip().splitlines())


def test_second_kernel_refused_then_started_after_the_first_is_killed(setup):
    env, p, cwd = setup
    first = Kernel(KERNEL, env=env, cwd=cwd)
    second = None
    try:
        reply, outputs = first.execute("1 + 1", timeout=120)
        assert reply["status"] == "ok", outputs
        vm_out = stdout_of(first.execute("%vm", timeout=120)[1])
        rows = _rows(vm_out)
        assert rows["limit vms_per_user"].startswith("1; counted by the kernels")
        qemu = int(re.search(r"QEMU pid (\d+)", rows["VM"]).group(1))
        with open(f"/proc/{qemu}/cgroup") as f:
            qemu_groups = f.read()
        if p.mode == "none":
            assert "NOT enforced" in rows["limit memory_per_user"]
        else:
            assert rows["limit memory_per_user"].startswith("3G; enforced: cgroup")
            assert rows["limit cpu_weight"].startswith("50; enforced: cgroup")
            user = p.writes[0].path.split("/", 4)[-1] if p.mode == "v1" else p.join[0]
            assert f"/user-{os.geteuid()}" in qemu_groups and p.groups[0].rsplit("/", 1)[-1] \
                in qemu_groups, (qemu_groups, user)

        # The same user's second kernel: its cells say which limit, and who raises it.
        second = Kernel(KERNEL, env=env, cwd=cwd)
        reply, outputs = second.execute("1 + 1", timeout=120)
        assert reply["status"] == "error"
        text = " ".join(m["content"].get("evalue", "") + " ".join(m["content"].get("traceback", []))
                        for m in outputs if m["msg_type"] == "error")
        assert "VM limit reached" in text and "c.MicroVMLimits.vms_per_user = 1" in text, text
        assert "admin" in text

        # The first kernel dies hard: its slot goes with it; the second's next cell runs.
        first.km.provisioner.process.send_signal(signal.SIGKILL)
        first.km.provisioner.process.wait(30)
        reply, outputs = second.execute("1 + 1", timeout=300)
        assert reply["status"] == "ok", outputs

        # Snapshot quota (1 MiB): the snapshot is taken, found past the quota and removed.
        reply, outputs = second.execute("%snapshot big", timeout=300)
        assert reply["status"] == "error"
        err = next(m["content"] for m in outputs if m["msg_type"] == "error")
        assert err["ename"] == "LimitExceeded" and "snapshot_quota" in err["evalue"], err
        listing = stdout_of(second.execute("%snapshots", timeout=120)[1])
        assert "big" not in listing, listing
    finally:
        try:
            first.kc.stop_channels()
            first.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - killed above
            pass
        if second is not None:
            second.shutdown()
