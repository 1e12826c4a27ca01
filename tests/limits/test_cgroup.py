"""cgroup enforcement (supermachine_kernel/limits/cgroup.py): the decision for each kind of host
(pure, from made-up host facts), and the path this host offers, carried out for real on a
process of the test's own (its memory ceiling kills it, its CPU share is set)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from supermachine_kernel.limits.cgroup import (
    HostFacts,
    apply,
    plan,
    remove_stale_leaves,
)
from supermachine_kernel.limits.config import MicroVMLimits

V1_HYBRID = HostFacts(
    mounts=(("/sys/fs/cgroup/cpu", "cgroup", "rw,relatime,cpu"),
            ("/sys/fs/cgroup/memory", "cgroup", "rw,relatime,memory"),
            ("/sys/fs/cgroup/unified", "cgroup2", "rw,relatime")),
    self_cgroup=(("4", "memory", "/"), ("1", "cpu", "/"), ("0", "", "/")),
    v2_controllers=frozenset({"hugetlb"}), euid=0)
V2 = HostFacts(
    mounts=(("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate"),),
    self_cgroup=(("0", "", "/user.slice/user-1000.slice/session-1.scope"),),
    v2_controllers=frozenset({"cpu", "memory", "io", "pids"}), euid=1000)
LIMITS = MicroVMLimits(memory_per_user="2G", cpu_weight=50, vms_per_user=2)


def test_v2_host_gets_a_user_group_and_a_leaf_per_kernel():
    p = plan(LIMITS, V2, uid=1000, pid=42)
    assert p.mode == "v2" and not p.inside_already
    assert p.groups == ["/sys/fs/cgroup/supermachine", "/sys/fs/cgroup/supermachine/user-1000",
                        "/sys/fs/cgroup/supermachine/user-1000/kernel-42"]
    assert {(w.file, w.value, w.limit) for w in p.writes} == {
        ("memory.max", str(2 << 30), "memory_per_user"), ("cpu.weight", "50", "cpu_weight")}
    assert p.join == ["/sys/fs/cgroup/supermachine/user-1000/kernel-42"]
    assert not p.not_enforced


def test_v2_inside_the_users_group_already_only_adds_its_leaf():
    facts = HostFacts(V2.mounts, (("0", "", "/supermachine/user-1000/server"),),
                      V2.v2_controllers, 1000)
    assert plan(LIMITS, facts, 1000, 7).inside_already
    facts = HostFacts(V2.mounts, (("0", "", "/supermachine/user-10000"),), V2.v2_controllers, 1)
    assert not plan(LIMITS, facts, 1000, 7).inside_already  # user-10000 is not user-1000


def test_hybrid_host_uses_v1_when_v2_has_no_controllers():
    p = plan(LIMITS, V1_HYBRID, uid=1000, pid=42)
    assert p.mode == "v1"
    assert {(w.path, w.file, w.value) for w in p.writes} == {
        ("/sys/fs/cgroup/memory/supermachine/user-1000", "memory.limit_in_bytes", str(2 << 30)),
        ("/sys/fs/cgroup/cpu/supermachine/user-1000", "cpu.shares", "512")}
    assert sorted(p.join) == ["/sys/fs/cgroup/cpu/supermachine/user-1000",
                              "/sys/fs/cgroup/memory/supermachine/user-1000"]


def test_no_controller_anywhere_says_why():
    facts = HostFacts((("/sys/fs/cgroup/unified", "cgroup2", "rw"),), (), frozenset({"pids"}), 0)
    p = plan(LIMITS, facts, 1000, 1)
    assert p.mode == "none"
    assert set(p.not_enforced) == {"memory_per_user", "cpu_weight"}
    assert "no cpu/memory controller" in p.not_enforced["cpu_weight"]
    assert "v1 cpu/memory hierarchy is not mounted" in p.not_enforced["cpu_weight"]
    assert apply(p, 1).not_enforced == p.not_enforced  # nothing claimed


def test_off_and_unset():
    off = MicroVMLimits(memory_per_user="1G", cgroups="off")
    assert plan(off, V2, 1000, 1).not_enforced == {
        "memory_per_user": "c.MicroVMLimits.cgroups = 'off'"}
    assert plan(MicroVMLimits(vms_per_user=3), V2, 1000, 1).mode == "none"
    forced = MicroVMLimits(cpu_weight=10, cgroups="v2")
    assert "v2" in plan(forced, V1_HYBRID, 0, 1).not_enforced["cpu_weight"]


# -- for real, on this host ---------------------------------------------------------------------

@pytest.fixture
def victim():
    """A process of our own to place (never the test process: other tests share it)."""
    p = subprocess.Popen([sys.executable, "-c",
                          "import sys\nfor line in sys.stdin: exec(line)"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def _real_plan(limits, pid):
    facts = HostFacts.read()
    p = plan(limits, facts, os.geteuid(), pid)
    if p.mode == "none":
        pytest.skip(f"no cgroup path on this host: {p.not_enforced}")
    if os.geteuid() != 0:
        pytest.skip("creating the per-user groups needs root (the Hub's spawner does it)")
    return p


def _cleanup(p):
    for group in reversed(p.groups):
        try:
            os.rmdir(group)
        except OSError:
            pass


def test_this_host_enforces_the_memory_ceiling_and_cpu_share(victim):
    limits = MicroVMLimits(memory_per_user="64M", cpu_weight=25,
                           cgroup_name=f"smk-test-{uuid.uuid4().hex[:8]}")
    p = _real_plan(limits, victim.pid)
    try:
        out = apply(p, victim.pid)
        assert set(out.enforced) == {"memory_per_user", "cpu_weight"}, out.not_enforced
        with open(f"/proc/{victim.pid}/cgroup") as f:
            mine = f.read()
        for group in out.groups:
            assert group.split(f"/{limits.cgroup_name}/")[1] in mine
        # A process in the group that goes past the ceiling is killed; the host is untouched.
        victim.stdin.write("x = bytearray(200 * 1024 * 1024); print(len(x), flush=True)\n")
        victim.stdin.flush()
        assert victim.wait(60) == -9
        assert victim.stdout.read() == ""
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
        remove_stale_leaves(p)
        _cleanup(p)
