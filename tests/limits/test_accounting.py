"""Limits accounting (supermachine_kernel/limits/accounting.py): slots held by real processes,
counted from other processes, freed when the holder is SIGKILLed; the messages name the limit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from supermachine_kernel.limits.accounting import (
    Ledger,
    LimitExceeded,
    check_snapshot_quota,
    check_vm_size,
)
from supermachine_kernel.limits.config import MicroVMLimits

HOLDER = textwrap.dedent("""
    import sys, time
    from supermachine_kernel.limits.accounting import Ledger, LimitExceeded
    from supermachine_kernel.limits.config import MicroVMLimits
    limits = MicroVMLimits(state_dir=sys.argv[1], vms_per_user=int(sys.argv[2]),
                           memory_per_user=sys.argv[3], host_max_vms=int(sys.argv[4]))
    try:
        slot = Ledger(limits).acquire(int(sys.argv[5]), label="holder")
    except LimitExceeded as e:
        print("refused:", e, flush=True)
        sys.exit(3)
    print("held", flush=True)
    time.sleep(600)
""")


def _hold(state: str, vms: int = 0, mem: str = "0", host: int = 0, mib: int = 512):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, state, str(vms), mem, str(host), str(mib)],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    return p, line


@pytest.fixture
def holders():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_vms_per_user_counts_other_processes_and_a_killed_kernel_frees_its_slot(tmp_path,
                                                                                holders):
    state = str(tmp_path / "state")
    a, line = _hold(state, vms=2)
    holders.append(a)
    assert line.startswith("held")
    b, line = _hold(state, vms=2)
    holders.append(b)
    assert line.startswith("held")
    c, line = _hold(state, vms=2)
    holders.append(c)
    assert c.wait(30) == 3
    assert "VM limit reached" in line and "2 VMs" in line
    assert "c.MicroVMLimits.vms_per_user = 2" in line and "admin" in line
    limits = MicroVMLimits(state_dir=state, vms_per_user=2)
    assert Ledger(limits).user_usage().vms == 2
    a.send_signal(signal.SIGKILL)
    a.wait(30)
    assert Ledger(limits).user_usage().vms == 1
    d, line = _hold(state, vms=2)
    holders.append(d)
    assert line.startswith("held")
    assert Ledger(limits).user_usage().vms == 2


def test_memory_per_user_sums_the_running_vms(tmp_path, holders):
    state = str(tmp_path / "state")
    a, line = _hold(state, mem="1G", mib=600)
    holders.append(a)
    assert line.startswith("held")
    b, line = _hold(state, mem="1G", mib=600)
    holders.append(b)
    assert b.wait(30) == 3
    assert "memory limit reached" in line and "600 MiB" in line and "1024 MiB" in line
    assert "c.MicroVMLimits.memory_per_user = '1G'" in line
    limits = MicroVMLimits(state_dir=state, memory_per_user="1G")
    assert Ledger(limits).user_usage().memory_mib == 600
    slot = Ledger(limits).acquire(400)  # 1000 MiB fits
    try:
        assert Ledger(limits).user_usage().memory_mib == 1000
    finally:
        slot.release()
    assert Ledger(limits).user_usage().memory_mib == 600


def test_host_cap_counts_every_user(tmp_path, holders):
    state = str(tmp_path / "state")
    a, line = _hold(state, host=1)
    holders.append(a)
    assert line.startswith("held")
    limits = MicroVMLimits(state_dir=state, host_max_vms=1)
    other = Ledger(limits)  # host slots are counted whoever holds them
    with pytest.raises(LimitExceeded, match="host_max_vms = 1"):
        other.acquire(256)
    # The refused kernel holds nothing: its user slot was given back.
    assert Ledger(limits).user_usage().vms == 1
    a.kill()
    a.wait(30)
    slot = Ledger(limits).acquire(256)
    assert Ledger(limits).host_usage() == 1
    slot.release()
    assert Ledger(limits).host_usage() == 0


def test_a_planted_user_dir_is_refused(tmp_path):
    state = tmp_path / "state"
    limits = MicroVMLimits(state_dir=str(state), vms_per_user=1)
    ledger = Ledger(limits)
    os.makedirs(state / f"user-{ledger.uid}", mode=0o777)
    os.chmod(state / f"user-{ledger.uid}", 0o777)
    with pytest.raises(LimitExceeded, match="admin should remove it"):
        ledger.acquire(128)


def test_vm_size_limits_name_the_setting():
    limits = MicroVMLimits(memory_per_vm="1G", vcpus_per_vm=2)
    check_vm_size(limits, 1024, 2)
    with pytest.raises(LimitExceeded, match=r"2048 MiB.*1024 MiB per VM.*memory_per_vm = '1G'"):
        check_vm_size(limits, 2048, 1)
    with pytest.raises(LimitExceeded, match=r"4 vCPUs.*vcpus_per_vm = 2"):
        check_vm_size(limits, 512, 4)
    check_vm_size(MicroVMLimits(), 1 << 20, 64)  # no limits set


def test_snapshot_quota_before_and_after_a_snapshot():
    mib = 1024 * 1024
    limits = MicroVMLimits(snapshot_quota="100M")
    check_snapshot_quota(limits, 99 * mib, 0)
    with pytest.raises(LimitExceeded, match="already use 100 MiB.*quota is 100 MiB"):
        check_snapshot_quota(limits, 100 * mib, 0)
    check_snapshot_quota(limits, 100 * mib, 0, taken_bytes=10 * mib)  # exactly at the quota
    with pytest.raises(LimitExceeded, match=r"this snapshot \(20 MiB\).*snapshot_quota"):
        check_snapshot_quota(limits, 101 * mib, 0, taken_bytes=20 * mib)
    check_snapshot_quota(MicroVMLimits(), 10**15, 0)


def test_killed_holder_frees_slot_while_a_child_survives(tmp_path, holders):
    """The lock is not inherited by processes the kernel starts (QEMU): O_CLOEXEC."""
    state = str(tmp_path / "state")
    script = HOLDER.replace('print("held", flush=True)',
                            'import subprocess; subprocess.Popen(["sleep", "600"]); '
                            'print("held", flush=True)')
    p = subprocess.Popen([sys.executable, "-c", script, state, "1", "0", "0", "128"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    holders.append(p)
    assert p.stdout.readline().startswith("held")
    limits = MicroVMLimits(state_dir=state, vms_per_user=1)
    assert Ledger(limits).user_usage().vms == 1
    p.kill()
    p.wait(30)
    try:
        deadline = time.monotonic() + 10
        while Ledger(limits).user_usage().vms and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Ledger(limits).user_usage().vms == 0
    finally:
        os.killpg(p.pid, signal.SIGKILL)
