"""The Hub's part (supermachine_kernel/limits/hub.py), for real on this host: root prepares a
user's group and state directories; a process of that (non-root) user then joins its group
through the kernel's own path (limits/kernel.py) and finds its limits enforced."""
from __future__ import annotations

import json
import logging
import os
import pwd
import tempfile
import types
import uuid

import pytest

from supermachine_kernel.limits import hub
from supermachine_kernel.limits.cgroup import HostFacts, plan
from supermachine_kernel.limits.config import MicroVMLimits
from supermachine_kernel.limits.kernel import KernelLimits

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def shared_dir():
    d = tempfile.mkdtemp(prefix="smk-limits-hub-")
    os.chmod(d, 0o755)  # the user's process reads the limits file here
    yield d


def _as_user(uid: int, gid: int, func) -> dict:
    """func() in a forked child running as uid/gid; its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result = func()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_a_users_kernel_joins_the_group_the_hub_prepared(shared_dir):
    if os.geteuid() != 0:
        pytest.skip("the Hub's part runs as root")
    name = f"smk-test-{uuid.uuid4().hex[:8]}"
    state = os.path.join(shared_dir, "state")
    path = os.path.join(shared_dir, "limits.py")
    with open(path, "w") as f:
        f.write(f"c.MicroVMLimits.memory_per_user = '1G'\nc.MicroVMLimits.cpu_weight = 30\n"
                f"c.MicroVMLimits.vms_per_user = 2\nc.MicroVMLimits.state_dir = {state!r}\n"
                f"c.MicroVMLimits.cgroup_name = {name!r}\n")
    os.chmod(path, 0o644)
    limits = MicroVMLimits(memory_per_user="1G", cpu_weight=30, vms_per_user=2,
                           state_dir=state, cgroup_name=name)
    p, out = hub.prepare_user(limits, NOBODY.pw_uid, NOBODY.pw_gid)
    if p.mode == "none":
        pytest.skip(f"no cgroup path on this host: {p.not_enforced}")
    try:
        assert set(out.enforced) == {"memory_per_user", "cpu_weight"}, out
        user_state = os.stat(os.path.join(state, f"user-{NOBODY.pw_uid}"))
        assert user_state.st_uid == NOBODY.pw_uid and user_state.st_mode & 0o777 == 0o700

        def kernel_start() -> dict:
            limits = KernelLimits(path)
            limits.enter(512, 1)
            with open("/proc/self/cgroup") as f:
                groups = f.read()
            assert limits.cgroups is not None
            return {"enforced": limits.cgroups.enforced,
                    "not_enforced": limits.cgroups.not_enforced, "groups": groups,
                    "report": limits.report()}

        got = _as_user(NOBODY.pw_uid, NOBODY.pw_gid, kernel_start)
        assert "error" not in got, got
        assert set(got["enforced"]) == {"memory_per_user", "cpu_weight"}, got
        assert f"/{name}/user-{NOBODY.pw_uid}" in got["groups"]
        report = dict(got["report"])
        assert report["limit cpu_weight"].startswith("30; enforced: cgroup")

        # Without the Hub's preparation a non-root kernel cannot make its group: it says so.
        other = f"smk-test-{uuid.uuid4().hex[:8]}"
        with open(path, "a") as f:
            f.write(f"c.MicroVMLimits.cgroup_name = {other!r}\n")
        got = _as_user(NOBODY.pw_uid, NOBODY.pw_gid, kernel_start)
        assert "error" not in got, got
        assert not got["enforced"]
        assert "cannot create" in got["not_enforced"]["memory_per_user"], got
        assert dict(got["report"])["limit memory_per_user"].startswith("1G; NOT enforced")
    finally:
        for group in sorted(set(p.groups), key=len, reverse=True):
            try:
                os.rmdir(group)
            except OSError:
                pass


def test_spawner_hook_and_preexec_put_the_server_in_its_users_group(shared_dir, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the Hub's part runs as root")
    pytest.importorskip("jupyterhub")
    name = f"smk-test-{uuid.uuid4().hex[:8]}"
    path = os.path.join(shared_dir, "limits.py")
    with open(path, "w") as f:
        f.write(f"c.MicroVMLimits.memory_per_user = '2G'\n"
                f"c.MicroVMLimits.state_dir = {os.path.join(shared_dir, 'state')!r}\n"
                f"c.MicroVMLimits.cgroup_name = {name!r}\n")
    monkeypatch.setenv("SUPERMACHINE_LIMITS_FILE", path)
    fake = types.SimpleNamespace(user=types.SimpleNamespace(name="nobody"),
                                 log=logging.getLogger("test"))
    hub.pre_spawn_hook(fake)
    limits = MicroVMLimits(memory_per_user="2G", cgroup_name=name)
    p = plan(limits, HostFacts.read(), NOBODY.pw_uid, 0)
    if p.mode == "none":
        pytest.skip(f"no cgroup path on this host: {p.not_enforced}")
    try:
        preexec = hub.LimitedLocalProcessSpawner().make_preexec_fn("nobody")

        def server() -> dict:
            with open("/proc/self/cgroup") as f:
                return {"uid": os.geteuid(), "groups": f.read()}

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                preexec()
                result = server()
            except BaseException as e:  # noqa: BLE001
                result = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 65536)
        os.close(r)
        os.waitpid(pid, 0)
        got = json.loads(data)
        assert got.get("uid") == NOBODY.pw_uid, got
        assert f"/{name}/user-{NOBODY.pw_uid}" in got["groups"], got
    finally:
        for group in sorted(set(p.groups), key=len, reverse=True):
            try:
                os.rmdir(group)
            except OSError:
                pass
