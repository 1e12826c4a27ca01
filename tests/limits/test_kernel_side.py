"""limits/kernel.py without a VM: what a kernel says and does for a missing, broken or empty
limits file, the slot it takes once per process, and a larger VM re-counted."""
from __future__ import annotations

import pytest

from supermachine_kernel.limits.accounting import Ledger, LimitExceeded
from supermachine_kernel.limits.config import MicroVMLimits
from supermachine_kernel.limits.kernel import KernelLimits


def test_no_file(tmp_path):
    k = KernelLimits(str(tmp_path / "absent.py"))
    k.enter(4096, 8)  # nothing limits it
    assert k.slot is None
    assert k.report() == [("limits", f"none ({tmp_path / 'absent.py'} does not exist)")]


def test_broken_file_refuses_every_vm(tmp_path):
    path = tmp_path / "limits.py"
    path.write_text("c.MicroVMLimits.vms_per_user = 'many'\n")
    k = KernelLimits(str(path))
    with pytest.raises(LimitExceeded, match=r"limits.py.*No VM starts until the admin fixes it"):
        k.enter(512, 1)
    assert k.report()[0][1].startswith("BROKEN: the limits file")


def test_empty_file_limits_nothing(tmp_path):
    path = tmp_path / "limits.py"
    path.write_text("# nothing set yet\n")
    k = KernelLimits(str(path))
    k.enter(512, 1)
    assert k.slot is None and k.report() == [("limits", f"none set in {path}")]


def test_one_slot_per_process_recounted_for_a_larger_vm(tmp_path):
    state = tmp_path / "state"
    path = tmp_path / "limits.py"
    path.write_text(f"c.MicroVMLimits.memory_per_user = '1G'\n"
                    f"c.MicroVMLimits.state_dir = {str(state)!r}\n"
                    f"c.MicroVMLimits.cgroups = 'off'\n")
    k = KernelLimits(str(path))
    k.enter(256, 1)  # the early restore's size
    k.enter(256, 1)  # the first launch: the same slot
    ledger = Ledger(MicroVMLimits(state_dir=str(state)))
    assert ledger.user_usage().vms == 1 and ledger.user_usage().memory_mib == 256
    k.enter(768, 1)  # configured larger than the snapshot first counted
    assert ledger.user_usage().vms == 1 and ledger.user_usage().memory_mib == 768
    with pytest.raises(LimitExceeded, match="memory limit reached"):
        KernelLimits(str(path)).enter(512, 1)  # another kernel of the same user
    assert dict(k.report())["limit memory_per_user"] == \
        "1G; NOT enforced: c.MicroVMLimits.cgroups = 'off'"
    k.slot.release()
