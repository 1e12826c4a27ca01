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


def test_idle_suspend_after_defaults_to_ten_minutes_and_refuses_negative() -> None:
    assert GuestConfig().idle_suspend_after == 600
    assert GuestConfig(idle_suspend_after=0).idle_suspend_after == 0
    with pytest.raises(TraitError, match="idle_suspend_after"):
        GuestConfig(idle_suspend_after=-1)


class _Guest:
    def __init__(self) -> None:
        self.busy = False
        self.handle = object()
        self.loop = None
        self.backend = None


class _Exposure:
    listening = True


class _Proxy:
    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def active_connections(self) -> int:  # a property, as on _core.NetProxy
        return self.n


class _Kernel:
    def __init__(self) -> None:
        self.in_request = False
        self.host_magics = type("H", (), {"exposures": type("X", (), {"by_port": {}})()})()
        self.network = type("N", (), {"proxy": _Proxy(0)})()


def _quiet_suspender() -> tuple:
    from supermachine_kernel.machine.idle import IdleSuspender

    kernel, guest = _Kernel(), _Guest()
    s = IdleSuspender(kernel, guest, after=10.0, root="/nonexistent")
    s.last_activity -= 60  # idle for a minute
    return s, kernel, guest


def test_quiet_when_nothing_holds_the_vm() -> None:
    s, _, _ = _quiet_suspender()
    assert s.quiet()


@pytest.mark.parametrize("what", ["recent", "busy", "no_guest", "in_request", "exposed",
                                  "connected"])
def test_what_keeps_the_vm(what: str) -> None:
    s, kernel, guest = _quiet_suspender()
    if what == "recent":
        s.touch()
    elif what == "busy":
        guest.busy = True
    elif what == "no_guest":
        guest.handle = None
    elif what == "in_request":
        kernel.in_request = True
    elif what == "exposed":
        kernel.host_magics.exposures.by_port[8050] = _Exposure()
    elif what == "connected":
        kernel.network.proxy.n = 2
    assert not s.quiet()


def test_describe_and_origin_for_vm() -> None:
    s, _, _ = _quiet_suspender()
    assert s.describe() == "after 10 s idle (c.MicroVMKernel.idle_suspend_after)"
    s.suspends, s.last_suspend_s, s.last_resume_s = 2, 0.5, 0.25
    s.last_kind, s.last_size = "incremental", 7 * 2**20
    assert s.describe().endswith("; suspended 2x (last snapshot incremental, 7.0 MiB, 0.50 s), "
                                 "last resume 0.25 s")
    vm, other = object(), object()
    assert s.resumed_origin(vm) is None
    s._resumed = (id(vm), 1000.0, "resumed after an idle suspend (0.25 s)")
    assert s.resumed_origin(vm) == (1000.0, "resumed after an idle suspend (0.25 s)")
    assert s.resumed_origin(other) is None


def test_no_idle_suspend_for_the_local_backend_or_when_off() -> None:
    from supermachine_kernel.machine.idle import start_idle_suspend

    guest = _Guest()
    guest.backend = type("B", (), {"name": "local"})()
    kernel = type("K", (), {"idle_suspend_after": 600.0, "guest": guest})()
    assert start_idle_suspend(kernel) is None
    guest.backend = type("B", (), {"name": "vm"})()
    kernel.idle_suspend_after = 0.0
    assert start_idle_suspend(kernel) is None


def test_a_failed_suspend_waits_for_another_idle_period() -> None:
    import asyncio

    from supermachine_kernel.machine.idle import IdleError

    s, _, guest = _quiet_suspender()

    class _Vm:
        def read_file(self, path: str) -> bytes:
            return b"cpu  1 0 1 1000 0 0 0 0\n"

    guest.handle = type("H", (), {"vm": _Vm()})()
    attempts = []

    async def failing() -> None:
        attempts.append(1)
        raise IdleError("snapshotting the idle VM failed: No space left on device")

    s.suspend = failing  # type: ignore[method-assign]

    async def checks(n: int) -> list[bool]:
        results = []
        for _ in range(n):
            results.append(await s.check())
            if s._sample is not None:  # as if the next check came a period later
                s._sample = (s._sample[0] - s.period, *s._sample[1:])
        return results

    assert asyncio.run(checks(2)) == [False, False]
    assert len(attempts) == 1
    assert asyncio.run(checks(3)) == [False, False, False]
    assert len(attempts) == 1, "a failed suspend is retried before another idle period"
