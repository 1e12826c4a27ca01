"""A small tree host -> guest -> host through a real microVM with the transfer functions (the
guest listing runs in the guest's python3, files move through the agent's file API)."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supermachine_kernel import api
from supermachine_kernel.workspace.host_writer import HostWriter
from supermachine_kernel.workspace.plan import TO_GUEST, TO_HOST, next_state, plan
from supermachine_kernel.workspace.scan import Limits, scan
from supermachine_kernel.workspace.transfer import GUEST_SOURCE, list_guest, pull, push

pytestmark = pytest.mark.vm

GUEST_ROOT = "/tmp/workspace-test"
NOW = dt.datetime(2026, 12, 6, 8, 15, 3)


@pytest.fixture(scope="module")
def vm() -> Iterator[api.Vm]:
    image = api.Image.build(progress=False)
    v = image.boot()
    yield v
    v.release()


def sh(vm: api.Vm, script: str) -> bytes:
    r = vm.exec(["sh", "-c", script], timeout_ms=60_000)
    assert r.exit_code == 0, r.stderr
    return bytes(r.stdout)


def test_tree_round_trip_through_a_vm(vm: api.Vm, tmp_path: Path) -> None:
    host_root = tmp_path / "ws"
    (host_root / "data").mkdir(parents=True)
    (host_root / "data" / "in.csv").write_bytes(b"x,y\n" + b"1,2\n" * 50_000)
    (host_root / "script.py").write_text("print('hi')\n")
    os.chmod(host_root / "script.py", 0o755)
    limits = Limits()
    sh(vm, f"rm -rf {GUEST_ROOT} && mkdir -p {GUEST_ROOT}")

    host = scan(host_root, limits)
    p = plan({}, host, list_guest(vm, GUEST_ROOT, limits), TO_GUEST, NOW)
    assert push(vm, str(host_root), GUEST_ROOT, p, host).refused == []
    digest = hashlib.sha256((host_root / "data" / "in.csv").read_bytes()).hexdigest().encode()
    assert sh(vm, f"cd {GUEST_ROOT} && sha256sum data/in.csv && stat -c %a script.py").split() == \
        [digest, b"data/in.csv", b"755"]
    guest = list_guest(vm, GUEST_ROOT, limits)
    state = next_state({}, p, host, guest)
    assert plan(state, host, guest, TO_HOST, NOW).empty()   # mtimes carried into the guest

    # What a cell might do: write a result, edit, delete, and plant a symlink to /etc/passwd.
    sh(vm, f"cd {GUEST_ROOT} && mkdir out && head -c 300000 /dev/urandom > out/r.bin && "
           f"echo edited >> script.py && rm data/in.csv && ln -s /etc/passwd passwd && mkfifo pipe")
    guest = list_guest(vm, GUEST_ROOT, limits)
    q = plan(state, scan(host_root, limits), guest, TO_HOST, NOW)
    with HostWriter(host_root) as w:
        got = pull(vm, w, GUEST_ROOT, q, guest, limits)
    assert got.refused == []
    assert (host_root / "out" / "r.bin").read_bytes() == vm.read_file(f"{GUEST_ROOT}/out/r.bin")
    assert (host_root / "script.py").read_text() == "print('hi')\nedited\n"
    assert not (host_root / "data" / "in.csv").exists()
    assert not (host_root / "passwd").exists() and not (host_root / "pipe").exists()
    assert {(k.path, k.reason) for k in guest.skipped} == {("passwd", "symlink"), ("pipe", "special")}


def test_the_watcher_works_in_the_guest(vm: api.Vm) -> None:
    vm.write_file("/tmp/sm_guest_side.py", GUEST_SOURCE)
    probe = (
        "import os, sys; sys.path.insert(0, '/tmp'); from sm_guest_side import Watcher\n"
        "os.makedirs('/tmp/watched/sub', exist_ok=True)\n"
        "w = Watcher('/tmp/watched', ['.git'], True)\n"
        "a = w.dirty()\n"
        "open('/tmp/watched/sub/new', 'w').write('x')\n"
        "print(a, w.dirty(), w.dirty())\n"
    )
    r = vm.exec(["python3", "-c", probe], timeout_ms=60_000)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == [b"False", b"True", b"False"]


class OlderAgent:
    """The same VM seen as one whose agent predates limited reads (pull's fallback path)."""
    agent_features: list[str] = []

    def __init__(self, vm: api.Vm) -> None:
        self._vm = vm

    def __getattr__(self, name: str) -> object:
        return getattr(self._vm, name)


class CountingVm(OlderAgent):
    """The VM as it is, counting the guest processes started through it."""
    def __init__(self, vm: api.Vm) -> None:
        super().__init__(vm)
        self.agent_features = vm.agent_features
        self.spawned = 0

    def spawn(self, argv: object, **kw: object) -> object:
        self.spawned += 1
        return self._vm.spawn(argv, **kw)


@pytest.mark.parametrize("path", ["agent read", "guest read process"])
def test_pull_refuses_files_swapped_after_the_listing(vm: api.Vm, tmp_path: Path,
                                                      path: str) -> None:
    """Listed as regular files, then swapped in the guest for a FIFO and a symlink to
    /dev/zero: refused (no hang, no endless stream), and the untouched file still copied; by
    the agent's limited read (no guest process) and by the older `read` process."""
    host_root = tmp_path / "ws"
    host_root.mkdir()
    sh(vm, f"rm -rf {GUEST_ROOT} && mkdir -p {GUEST_ROOT} && cd {GUEST_ROOT} && "
           "for f in fifo zero grow ok; do echo $f > $f; done")
    limits = Limits(max_file_bytes=1000)
    guest = list_guest(vm, GUEST_ROOT, limits)
    sh(vm, f"cd {GUEST_ROOT} && rm fifo zero && mkfifo fifo && ln -s /dev/zero zero && "
           "head -c 500 /dev/urandom >> grow")
    q = plan({}, scan(host_root, limits), guest, TO_HOST, NOW)
    who = CountingVm(vm) if path == "agent read" else OlderAgent(vm)
    assert ("read_limits" in who.agent_features) == (path == "agent read")
    with HostWriter(host_root) as w:
        got = pull(who, w, GUEST_ROOT, q, guest, limits, timeout=120)
    refused = dict(got.refused)
    assert "ok" in got.copied and {"fifo", "zero"} <= set(refused), refused
    assert not {"fifo", "zero"} & set(os.listdir(host_root))
    if isinstance(who, CountingVm):
        # The agent read also holds the listed size: a file that grew is copied next time.
        assert got.copied == ["ok"] and sorted(refused) == ["fifo", "grow", "zero"], refused
        assert "copied again after the next cell" in refused["grow"]
        assert "FIFO" in refused["fifo"] and "symlink" in refused["zero"], refused
        assert who.spawned == 0
