"""Idle suspend's pure parts (machine/idle.py): the guest CPU sample, the sweep of snapshots
left by kernels that are gone, the trait. The suspend and resume themselves are tested through
real kernels in tests/kernel/test_idle_suspend.py."""
from __future__ import annotations

import os
import subprocess

import pytest
from traitlets import TraitError

from supermachine_kernel.kernel.config import GuestConfig
from supermachine_kernel.machine.idle import cpu_ticks, sweep

STAT = (b"cpu  120 5 30 1000 7 2 3 1 0 0\n"
        b"cpu0 120 5 30 1000 7 2 3 1 0 0\nintr 1 2 3\n")


def test_cpu_ticks_counts_busy_and_total() -> None:
    busy, total = cpu_ticks(STAT)
    assert busy == 120 + 5 + 30 + 2 + 3 + 1
    assert total == busy + 1000 + 7


def test_cpu_ticks_of_an_old_kernel_without_steal() -> None:
    assert cpu_ticks(b"cpu  1 2 3 4\n") == (6, 10)


@pytest.mark.parametrize("bad", [b"", b"intr 1 2\n", b"cpu  x y z\n"])
def test_cpu_ticks_refuses_what_is_not_proc_stat(bad: bytes) -> None:
    with pytest.raises(ValueError):
        cpu_ticks(bad)


def _start_ticks(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def test_sweep_removes_only_snapshots_of_processes_that_are_gone(tmp_path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = tmp_path / f"{os.getpid()}-{_start_ticks(os.getpid())}-1"
    dead = tmp_path / f"{gone.pid}-{_start_ticks(os.getpid())}-1"
    reused = tmp_path / f"{os.getpid()}-1-2"  # same pid, another start time: pid reused
    other = tmp_path / "not-a-kernel"
    for d in (mine, dead, reused, other):
        d.mkdir()
        (d / "memory").write_bytes(b"x")
    removed = sweep(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(reused)])
    assert mine.exists() and other.exists()
    assert not dead.exists() and not reused.exists()


def test_sweep_of_a_missing_root_does_nothing(tmp_path) -> None:
    assert sweep(str(tmp_path / "nope")) == []


def test_idle_suspend_after_defaults_off_and_refuses_negative() -> None:
    assert GuestConfig().idle_suspend_after == 0
    assert GuestConfig(idle_suspend_after=600).idle_suspend_after == 600
    with pytest.raises(TraitError, match="idle_suspend_after"):
        GuestConfig(idle_suspend_after=-1)
