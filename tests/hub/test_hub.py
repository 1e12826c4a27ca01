"""deploy/jupyterhub/ for real: a JupyterHub with configurable-http-proxy on 127.0.0.1, two local
users created for the test, LocalProcessSpawner. Through the Hub's REST API and each user's
server (kernel REST API and websocket), the users run cells in "Python (microVM)" kernels
restored from the host-wide store (conftest.py prepares it as an admin would)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from datetime import datetime
from typing import Iterator

import pytest

from .conftest import KERNEL, Hub, LocalUser, parent_of, qemu_pids, uid_of

pytestmark = pytest.mark.timeout(1800)


def _started(hub: Hub, user: LocalUser) -> tuple[str, float]:
    """Starts a kernel for `user` and runs its first cell; returns (kernel id, seconds from
    the start request to that cell's reply)."""
    t0 = time.monotonic()
    kid = hub.api.start_kernel(user.name)
    r = hub.api.run(user.name, kid, "print(6 * 7)")
    assert r.status == "ok", r
    assert r.stdout.strip() == "42"
    return kid, time.monotonic() - t0


@pytest.fixture(scope="module")
def kernels(hub: Hub) -> Iterator[dict[str, str]]:
    """Each user's server and one microVM kernel (each user's first ever)."""
    out = {}
    for user in hub.users:
        hub.api.start_server(user.name, hub.log)
        kid, seconds = _started(hub, user)
        print(f"\n{user.name}: first-ever kernel start to first cell reply: {seconds:.2f} s")
        out[user.name] = kid
    yield out


def _kernel_processes(user: LocalUser) -> dict[int, int]:
    """The user's QEMU processes: pid -> pid of the kernel process that owns it."""
    return {pid: parent_of(pid) for pid in qemu_pids(user.uid)}


def test_only_the_microvm_kernels_are_offered(hub: Hub, kernels: dict[str, str]) -> None:
    for user in hub.users:
        specs = hub.api.server(user.name, "GET", "/kernelspecs")
        assert set(specs["kernelspecs"]) == {KERNEL}, specs["kernelspecs"].keys()
        assert specs["default"] == KERNEL
        r = hub.api.http.post(f"{hub.api.base}/user/{user.name}/api/kernels",
                              json={"name": "python3"}, timeout=60)
        assert r.status_code >= 400, "the unisolated python3 kernel could be started"
        r = hub.api.http.post(f"{hub.api.base}/user/{user.name}/api/terminals", timeout=60)
        assert r.status_code == 404, "a host terminal could be opened"


def test_cells_run_in_the_guest_and_qemu_runs_as_the_user(hub: Hub, kernels: dict[str, str]) -> None:
    for user in hub.users:
        r = hub.api.run(user.name, kernels[user.name],
                        "import os; print(os.getuid(), open('/proc/cmdline').read().split()[0])")
        assert r.status == "ok", r
        # the guest's unprivileged user (issue 16), in our guest kernel
        assert r.stdout.split() == ["1000", "console=ttyS0"], r
        owners = _kernel_processes(user)
        assert owners, f"no QEMU runs as {user.name}"
        for qemu, kernel in owners.items():
            assert uid_of(qemu) == user.uid
            assert kernel is not None and uid_of(kernel) == user.uid
    every = qemu_pids()
    for user in hub.users:
        # No QEMU of this user's kernels runs as anyone else (root included).
        kernels_of_user = {p for p in _kernel_processes(user).values()}
        assert all(uid == user.uid for pid, uid in every.items() if parent_of(pid) in kernels_of_user)


def test_hub_variables_do_not_reach_the_guest(hub: Hub, kernels: dict[str, str]) -> None:
    for user in hub.users:
        kernel_pids = set(_kernel_processes(user).values())
        assert kernel_pids
        with open(f"/proc/{next(iter(kernel_pids))}/environ", "rb") as f:
            host_env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        # The kernel process (the user's, on the host) has them: they must stop there.
        assert b"JUPYTERHUB_API_TOKEN" in host_env
        secrets = {v.decode() for k, v in host_env.items()
                   if k.startswith(b"JUPYTERHUB_") or k == b"JPY_API_TOKEN"}
        r = hub.api.run(user.name, kernels[user.name],
                        "import os, json; print(json.dumps(dict(os.environ)))")
        assert r.status == "ok", r
        guest_env = json.loads(r.stdout)
        leaked = [k for k in guest_env if k.startswith(("JUPYTERHUB_", "JPY_"))]
        assert not leaked, leaked
        assert not [k for k, v in guest_env.items() if v in secrets and v], "a Hub value leaked"


def test_a_users_snapshots_and_workspace_are_theirs_alone(hub: Hub, kernels: dict[str, str]) -> None:
    a, b = hub.users
    # The workspace: the server's (and so each kernel's) directory is the user's home.
    r = hub.api.run(a.name, kernels[a.name], "open('notes.txt', 'w').write('A only')")
    assert r.status == "ok", r
    ls = subprocess.run(["runuser", "-u", b.name, "--", "ls", a.home], capture_output=True, text=True)
    assert ls.returncode != 0 and "Permission denied" in ls.stderr
    r = hub.api.run(b.name, kernels[b.name], "import os; print(os.path.exists('notes.txt'))")
    assert r.status == "ok" and r.stdout.strip() == "False", r
    r = hub.api.run(a.name, kernels[a.name], "secret_a = 'only for A'")
    assert r.status == "ok", r
    r = hub.api.run(a.name, kernels[a.name], "%snapshot hubtest")
    assert r.status == "ok", r
    root = os.path.join(a.home, ".local", "share", "jupyter", "supermachine-kernel", "snapshots")
    groups = [g for g in os.listdir(root) if os.path.isdir(os.path.join(root, g, "hubtest"))]
    assert len(groups) == 1, os.listdir(root)  # no notebook session: named after the kernel
    group = groups[0]
    st = os.stat(root)
    assert st.st_uid == a.uid and stat.S_IMODE(st.st_mode) == 0o700
    # B, on the host (a terminal in B's server runs as B), can neither list nor read them.
    ls = subprocess.run(["runuser", "-u", b.name, "--", "ls", root], capture_output=True, text=True)
    assert ls.returncode != 0 and "Permission denied" in ls.stderr
    memory = os.path.join(root, group, "hubtest", "memory")
    cat = subprocess.run(["runuser", "-u", b.name, "--", "head", "-c1", memory], capture_output=True)
    assert cat.returncode != 0
    # B's kernel lists only B's own store, and cannot restore A's snapshot by its name.
    r = hub.api.run(b.name, kernels[b.name], "%snapshots --all")
    assert "hubtest" not in r.stdout + r.stderr + json.dumps(r.results)
    r = hub.api.run(b.name, kernels[b.name], f"%restore {group}/hubtest")
    assert r.status == "error" or r.error or r.stderr, r
    r = hub.api.run(b.name, kernels[b.name], "print('secret_a' in dir())")
    assert r.status == "ok" and r.stdout.strip() == "False", r


def test_second_kernel_start_of_a_user(hub: Hub, kernels: dict[str, str]) -> None:
    """Figures for the report (printed; speed targets are not asserted here)."""
    a = hub.users[0]
    kid, seconds = _started(hub, a)
    print(f"\n{a.name}: second kernel start to first cell reply: {seconds:.2f} s")
    hub.api.server(a.name, "DELETE", f"/kernels/{kid}")


def _wait_kernel_gone(hub: Hub, user: LocalUser, kid: str) -> None:
    hub.api.server(user.name, "DELETE", f"/kernels/{kid}")
    deadline = time.monotonic() + 120
    while any(k["id"] == kid for k in hub.api.server(user.name, "GET", "/kernels")):
        assert time.monotonic() < deadline, f"kernel {kid} was not shut down"
        time.sleep(1)


def test_the_admins_limits_hold_under_the_hub(hub: Hub, kernels: dict[str, str]) -> None:
    """The limits file the Hub and the kernels share (deploy/jupyterhub/limits.md): a kernel past
    vms_per_user is refused with a message naming the setting and who raises it; the user's QEMU
    runs inside the user's cgroup, whose ceiling and share are the file's (when the host has
    cgroups; otherwise %vm must say they are not enforced, and why)."""
    from .conftest import HUB_CPU_WEIGHT, HUB_MEMORY_PER_USER, HUB_VMS_PER_USER

    a = hub.users[0]
    r = hub.api.run(a.name, kernels[a.name], "%vm")
    assert r.status == "ok", r
    rows = {line.split(None, 2)[1]: line.split(None, 2)[2] for line in r.stdout.splitlines()
            if line.startswith("limit ")}
    assert rows["vms_per_user"].startswith(str(HUB_VMS_PER_USER)), rows
    memory_row = rows["memory_per_user"]
    assert memory_row.startswith(HUB_MEMORY_PER_USER), rows
    extra = []
    try:
        for _ in range(HUB_VMS_PER_USER - 1):  # up to the limit: these run
            kid = hub.api.start_kernel(a.name)
            extra.append(kid)
            ok = hub.api.run(a.name, kid, "print(6 * 7)")
            assert ok.status == "ok" and ok.stdout.strip() == "42", ok
        kid = hub.api.start_kernel(a.name)
        extra.append(kid)
        refused = hub.api.run(a.name, kid, "print(6 * 7)")
        text = refused.error + refused.stderr
        assert refused.status == "error" and "42" not in refused.stdout, refused
        assert "VM limit reached" in text, text
        assert f"c.MicroVMLimits.vms_per_user = {HUB_VMS_PER_USER}" in text and "admin" in text, text
    finally:
        for kid in extra:
            _wait_kernel_gone(hub, a, kid)
    if "NOT enforced" in memory_row:
        pytest.skip(f"this host has no cgroup the Hub can use: {memory_row}")
    assert "enforced" in memory_row, memory_row
    limit_bytes = 3 * 1024 ** 3
    assert str(limit_bytes) in memory_row, memory_row
    cpu_row = rows["cpu_weight"]
    assert cpu_row.startswith(str(HUB_CPU_WEIGHT)) and "enforced" in cpu_row, rows
    for pid in qemu_pids(a.uid):
        with open(f"/proc/{pid}/cgroup") as f:
            groups = f.read()
        assert f"supermachine/user-{a.uid}" in groups, (pid, groups)


def _last_activity(hub: Hub, user: LocalUser) -> datetime:
    server = hub.api.user_model(user.name)["servers"][""]
    return datetime.fromisoformat(server["last_activity"].replace("Z", "+00:00"))


def test_idle_culler_sees_kernel_activity_and_culling_leaves_no_qemu(hub: Hub, kernels: dict[str, str]) -> None:
    a = hub.users[0]
    time.sleep(6)  # one activity report goes by, so what follows is the cell's
    before = _last_activity(hub, a)
    r = hub.api.run(a.name, kernels[a.name], "sum(range(10))")
    assert r.status == "ok", r
    deadline = time.monotonic() + 60
    while _last_activity(hub, a) <= before:
        assert time.monotonic() < deadline, "the Hub never saw the kernel's activity"
        time.sleep(1)
    for user in hub.users:
        assert qemu_pids(user.uid), f"{user.name} has no VM before culling"
    culler = subprocess.Popen(hub.culler_command, env=hub.culler_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while any(hub.api.user_model(u.name)["servers"] for u in hub.users):
            assert time.monotonic() < deadline, "the idle culler stopped no server"
            time.sleep(2)
    finally:
        culler.terminate()
        culler.wait(30)
    deadline = time.monotonic() + 60
    while any(qemu_pids(u.uid) for u in hub.users):
        assert time.monotonic() < deadline, {u.name: qemu_pids(u.uid) for u in hub.users}
        time.sleep(1)
