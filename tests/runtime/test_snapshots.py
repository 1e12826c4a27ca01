"""Snapshots, restore and the pool (real microVMs).

One image is baked per test session (into a temporary snapshots dir): its warmup writes a
marker file and starts a small REPL whose state must survive into every restore."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from supermachine_kernel import api

from .helpers import pid_alive, wait_until

pytestmark = pytest.mark.vm

# A line-oriented REPL: "set K V" stores, "get K" prints the value.
REPL = r"""
import sys
state = {"boot": "warm"}
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, rest = line.strip().partition(" ")
    if cmd == "set":
        k, _, v = rest.partition(" ")
        state[k] = v
        print("ok", flush=True)
    elif cmd == "get":
        print(state.get(rest, "<unset>"), flush=True)
"""


def read_line(child, timeout: float = 60) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = child.read_stdout(timeout=timeout)
        assert chunk, f"EOF; got {out!r}"
        out += chunk
    return out


def warmup(vm: api.Vm) -> None:
    vm.write_file("/etc/baked-marker", b"baked")
    vm.write_file("/root/repl.py", REPL)
    child = vm.spawn(["python3", "-u", "/root/repl.py"])
    assert read_line(child) == b"ready\n"
    vm.write_file("/root/repl.id", str(child.id))


@pytest.fixture(scope="session")
def snapshots_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("snapshots")


@pytest.fixture(scope="session")
def baked(snapshots_dir) -> api.Image:
    return api.Image.build(snapshots_dir=snapshots_dir, warmup=warmup, warmup_tag="test-repl-v1", progress=False)


def repl_of(vm: api.Vm):
    return vm.attach_process(int(vm.read_file("/root/repl.id")))


def test_cache_hit_returns_the_same_snapshot(baked, snapshots_dir):
    again = api.Image.build(snapshots_dir=snapshots_dir, warmup=warmup, warmup_tag="test-repl-v1", progress=False)
    assert again.snapshot == baked.snapshot
    meta = json.loads(open(os.path.join(baked.snapshot, "metadata.json")).read())
    assert meta["kind"] == "template"
    assert meta["machine"]["memory_mib"] == 256
    assert meta["labels"]["warmup_tag"] == "test-repl-v1"


def test_state_survives_restore(baked):
    with baked.boot() as vm:
        assert vm.read_file("/etc/baked-marker") == b"baked"
        repl = repl_of(vm)
        repl.write_stdin(b"get boot\n")
        assert read_line(repl) == b"warm\n"


def test_clones_have_different_rng_and_a_fresh_clock(baked):
    a = api.Vm(api._core.Vm.restore(baked.snapshot))
    b = api.Vm(api._core.Vm.restore(baked.snapshot))
    try:
        ra = a.exec(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]).stdout
        rb = b.exec(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]).stdout
        assert ra != rb
        pa = a.exec(["python3", "-c", "import os; print(os.urandom(16).hex())"]).stdout
        pb = b.exec(["python3", "-c", "import os; print(os.urandom(16).hex())"]).stdout
        assert pa != pb
        for vm in (a, b):
            host_before = time.time()
            guest = float(vm.exec(["date", "+%s.%N"]).stdout)
            host_after = time.time()
            assert host_before - 1 <= guest <= host_after + 1, (host_before, guest, host_after)
        assert a.boot_id == b.boot_id  # one snapshot lineage
    finally:
        a.release()
        b.release()


def test_mid_flight_snapshot_reattaches_a_running_repl(baked, tmp_path):
    with baked.boot() as vm:
        repl = repl_of(vm)
        repl.write_stdin(b"set answer 42\n")
        assert read_line(repl) == b"ok\n"
        vm.write_file("/tmp/mid-flight", b"written before the snapshot")
        t = time.monotonic()
        image = vm.snapshot(tmp_path / "mid")
        took = time.monotonic() - t
        # the source VM runs on, REPL included
        repl.write_stdin(b"set answer 43\n")
        assert read_line(repl) == b"ok\n"
    meta = json.loads((tmp_path / "mid" / "metadata.json").read_text())
    # A restored VM's RAM is a private mapping, so QEMU streams it; the stream is split into
    # a sparse memory file + device state, restorable copy-on-write like a template.
    assert meta["kind"] == "template"
    mem = tmp_path / "mid" / "memory"
    assert mem.stat().st_size == meta["machine"]["memory_mib"] << 20
    assert 0 < mem.stat().st_blocks * 512 < mem.stat().st_size
    assert (tmp_path / "mid" / "state").stat().st_size < 4 << 20
    assert took < 60
    for _ in range(2):
        with image.boot() as clone:
            assert clone.read_file("/tmp/mid-flight") == b"written before the snapshot"
            r = repl_of(clone)
            r.write_stdin(b"get answer\n")
            assert read_line(r) == b"42\n"
            r.close_stdin()
            assert r.wait(timeout=60).exit_code == 0


def test_snapshot_of_a_cold_booted_vm_is_a_template(image, tmp_path):
    with image.cold_boot() as vm:
        vm.write_file("/tmp/cold", b"cold")
        snap = vm.snapshot(tmp_path / "cold")
        assert vm.exec(["cat", "/tmp/cold"]).stdout == b"cold"  # runs on
        with pytest.raises(api.SnapshotError, match="already exists"):
            vm.snapshot(tmp_path / "cold")
        assert vm.exec(["true"]).exit_code == 0
    meta = json.loads((tmp_path / "cold" / "metadata.json").read_text())
    assert meta["kind"] == "template"
    # the memory file is sparse: far smaller on disk than the guest RAM
    st = os.stat(tmp_path / "cold" / "memory")
    assert st.st_blocks * 512 < st.st_size
    with snap.boot() as clone:
        assert clone.read_file("/tmp/cold") == b"cold"


def test_agent_without_qemu_cannot_be_snapshotted(unix_vm, tmp_path):
    with pytest.raises(ValueError, match="only QEMU-backed VMs"):
        unix_vm.snapshot(tmp_path / "nope")
    assert unix_vm.exec(["true"]).exit_code == 0


def corrupt_copy(src: str, dst) -> str:
    subprocess.run(["cp", "-a", "--sparse=always", src, str(dst)], check=True)
    return str(dst)


def test_corrupted_snapshot_is_refused(baked, tmp_path):
    bad = corrupt_copy(baked.snapshot, tmp_path / "bad")
    with open(os.path.join(bad, "state"), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(api.SnapshotError, match="checksum"):
        api.Image.from_snapshot(bad)
    truncated = corrupt_copy(baked.snapshot, tmp_path / "short")
    os.truncate(os.path.join(truncated, "memory"), 4096)
    with pytest.raises(api.SnapshotError, match="memory"):
        api.Image.from_snapshot(truncated)
    with pytest.raises(api.SnapshotError, match="metadata.json is missing"):
        api.Image.from_snapshot(tmp_path)


def test_mismatched_snapshot_is_refused(baked, tmp_path):
    other = corrupt_copy(baked.snapshot, tmp_path / "other")
    meta_path = os.path.join(other, "metadata.json")
    meta = json.loads(open(meta_path).read())
    meta["machine"]["qemu_version"] = "QEMU emulator version 1.0"
    open(meta_path, "w").write(json.dumps(meta))
    image = api.Image.from_snapshot(other)  # the files themselves are intact
    with pytest.raises(api.SnapshotError, match="QEMU version"):
        image.boot()
    with pytest.raises(api.SnapshotError, match="cannot be restored here.*QEMU version"):
        api._core.snapshot_info(other, check_host=True)
    assert api._core.snapshot_info(baked.snapshot, check_host=True)["path"] == baked.snapshot


def test_build_rebakes_a_cached_snapshot_this_host_cannot_restore(tmp_path):
    """A QEMU upgrade (or a changed command line) must not leave Image.build handing out a
    cached snapshot that every restore refuses."""
    first = api.Image.build(snapshots_dir=tmp_path, progress=False)
    meta_path = os.path.join(first.snapshot, "metadata.json")
    meta = json.loads(open(meta_path).read())
    meta["machine"]["qemu_version"] = "QEMU emulator version 1.0"
    open(meta_path, "w").write(json.dumps(meta))
    again = api.Image.build(snapshots_dir=tmp_path, progress=False)
    assert again.snapshot == first.snapshot
    assert json.loads(open(meta_path).read())["machine"]["qemu_version"] != "QEMU emulator version 1.0"
    with again.boot() as vm:
        assert vm.exec(["true"]).exit_code == 0


# ---------------------------------------------------------------- the pool


def test_pool_acquire_returns_the_vm_and_release_restores_it(baked):
    """The seed's shape: vm = pool.acquire(); vm.exec(...); vm.release(). The released VM is
    replaced by a fresh restore, so the next user does not see what this one wrote."""
    pool = baked.pool(min=1, max=1)
    try:
        vm = pool.acquire()
        assert isinstance(vm, api.Vm) and vm.pool is pool
        assert vm.exec(["python3", "-c", "print(6 * 7)"]).stdout == b"42\n"
        vm.write_file("/tmp/left-behind", b"private")
        first_pid = vm.qemu_pid
        facts = (vm.restored_from, vm.accel, vm.boot_id)
        st = pool.stats()
        assert (st["in_use"], st["idle"]) == (1, 0)
        vm.release()
        assert pool.stats()["in_use"] == 0
        assert wait_until(lambda: pool.stats()["idle"] == 1, 120), pool.stats()
        assert wait_until(lambda: not pid_alive(first_pid), 20)
        vm.release()  # a second release does nothing
        assert not vm.alive and vm.qemu_pid is None and "released" in repr(vm)
        assert (vm.restored_from, vm.accel, vm.boot_id) == facts  # fixed facts stay readable
        with pytest.raises(api.VmReleasedError, match=r"given back to its pool.*pool\.acquire\(\)"):
            vm.exec(["true"])
        with pool.acquire() as again:
            assert pool.stats()["in_use"] == 1
            assert again.exec(["test", "-e", "/tmp/left-behind"]).exit_code == 1
            assert again.qemu_pid != first_pid
        assert pool.stats()["in_use"] == 0
        with pytest.raises(api.VmReleasedError):
            again.read_file("/etc/baked-marker")
    finally:
        pool.shutdown()


def test_pool_without_restore_on_release_reuses_the_vm(baked):
    pool = baked.pool(min=1, max=2, restore_on_release=False)
    try:
        # Let the pool fill first, so that acquire takes its one VM instead of starting another.
        assert wait_until(lambda: pool.stats()["idle"] == 1, 120), pool.stats()
        with pool.acquire() as vm:
            vm.write_file("/tmp/kept", b"kept")
            pid = vm.qemu_pid
        vm.release()  # again, after the with block: must not return the VM a second time
        st = pool.stats()
        assert (st["in_use"], st["idle"]) == (0, 1)
        nxt = pool.acquire()
        other = pool.acquire()
        try:
            assert nxt.qemu_pid == pid and other.qemu_pid != pid
            assert nxt.read_file("/tmp/kept") == b"kept"
            # The old handle must not reach the VM someone else holds now, nor destroy it.
            with pytest.raises(api.VmReleasedError, match="given back to its pool"):
                vm.read_file("/tmp/kept")
            with pytest.raises(api.VmReleasedError, match="call discard\\(\\) instead of release"):
                vm.discard()
            assert nxt.exec(["true"]).exit_code == 0
        finally:
            other.release()
        nxt.discard()  # destroyed instead of given back
        nxt.release()  # a no-op after discard (what a with block does after a discard inside it)
        nxt.discard()
        assert wait_until(lambda: not pid_alive(pid), 20)
        with pytest.raises(api.VmReleasedError, match="destroyed by discard"):
            nxt.exec(["true"])
        assert pool.stats()["in_use"] == 0
        with pool.acquire() as vm:
            assert vm.qemu_pid != pid
            assert vm.exec(["test", "-e", "/tmp/kept"]).exit_code == 1
    finally:
        pool.shutdown()


def test_discard_of_a_booted_vm_kills_it(baked):
    vm = baked.boot()
    try:
        assert vm.pool is None
        pid = vm.qemu_pid
        vm.discard()
        assert wait_until(lambda: not pid_alive(pid), 20)
        vm.discard()
        vm.release()
        with pytest.raises(api.VmReleasedError):
            vm.exec(["true"])
    finally:
        vm.release()


def test_lease_is_a_deprecated_alias_of_vm():
    with pytest.warns(DeprecationWarning, match="pool.acquire\\(\\) returns the Vm itself"):
        from supermachine_kernel.api import Lease
    assert Lease is api.Vm
    with pytest.raises(AttributeError):
        api.NoSuchThing


def test_pool_saturation_timeout_and_fifo(baked):
    pool = baked.pool(min=1, max=1, acquire_timeout_ms=500)
    try:
        held = pool.acquire()
        t = time.monotonic()
        with pytest.raises(TimeoutError, match="no VM became free"):
            pool.acquire()
        assert 0.4 <= time.monotonic() - t < 10
        held.release()

        slow = baked.pool(min=1, max=1, acquire_timeout_ms=0)
        order = []
        try:
            held = slow.acquire()
            threads = []
            for i in range(3):
                def take(i=i):
                    with slow.acquire():
                        order.append(i)
                th = threading.Thread(target=take)
                th.start()
                threads.append(th)
                assert wait_until(lambda: slow.stats()["waiting"] == i + 1, 10)
            st = slow.stats()
            assert (st["in_use"], st["waiting"], st["max"]) == (1, 3, 1)
            held.release()
            for th in threads:
                th.join(120)
            assert order == [0, 1, 2]
        finally:
            slow.shutdown()
    finally:
        pool.shutdown()


def test_pool_replaces_a_vm_that_died_while_idle(baked):
    pool = baked.pool(min=1, max=1, restore_on_release=False)
    try:
        with pool.acquire() as vm:
            pid = vm.qemu_pid
            runtime_vm = vm._vm  # the pool's own handle: it still sees the VM once given back
        os.kill(pid, 9)
        # A SIGKILLed QEMU takes a moment to die and the runtime a moment more to notice (its
        # agent connection breaks): wait until the pool's liveness check says so.
        assert wait_until(lambda: not pid_alive(pid) and not runtime_vm.alive, 10)
        with pool.acquire() as vm:
            assert vm.exec(["true"]).exit_code == 0
            assert vm.qemu_pid != pid
    finally:
        pool.shutdown()


def test_pool_shutdown_leaves_no_qemu(baked):
    pool = baked.pool(min=2, max=3)
    vms = [pool.acquire() for _ in range(3)]
    pids = [vm.qemu_pid for vm in vms]
    vms[0].release()
    pool.shutdown()
    with pytest.raises(api.PoolError):
        pool.acquire()
    # VMs still out keep working until they are released; then they die instead of going back.
    assert vms[1].exec(["true"]).exit_code == 0
    for vm in vms[1:]:
        vm.release()
        vm.release()
    with pytest.raises(api.VmReleasedError):
        vms[1].exec(["true"])
    assert pool.stats()["in_use"] == 0 and pool.stats()["idle"] == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 20), pids


def test_pause_freezes_the_guest_and_resume_resyncs_it(baked):
    with baked.boot() as vm:
        ticker = vm.spawn(["sh", "-c", "while :; do echo t; sleep 0.05; done"])
        assert ticker.read_stdout(timeout=30)
        before = vm.exec(["cat", "/run/supermachine/generation"]).stdout
        urandom_before = vm.exec(["head", "-c", "16", "/dev/urandom"]).stdout
        vm.pause()
        # Frozen: the ticker's pending output is drained, then nothing new arrives.
        with pytest.raises(TimeoutError):
            while ticker.read_stdout(timeout=0.5):
                pass
        with pytest.raises(TimeoutError):
            ticker.read_stdout(timeout=1.5)
        time.sleep(1.5)  # wall time passes; the guest's clock must not lag after resume
        generation = vm.resume()
        assert ticker.read_stdout(timeout=30)  # it runs again, same handle
        assert generation == int(before) + 1
        host_before = time.time()
        guest = float(vm.exec(["date", "+%s.%N"]).stdout)
        assert host_before - 1 <= guest <= time.time() + 1
        assert vm.exec(["head", "-c", "16", "/dev/urandom"]).stdout != urandom_before
        ticker.signal(9)


def test_full_snapshot_when_splitting_is_off(baked, tmp_path, monkeypatch):
    """SUPERMACHINE_SNAPSHOT_SPLIT=0: RAM stays in the migration stream; it still restores."""
    monkeypatch.setenv("SUPERMACHINE_SNAPSHOT_SPLIT", "0")
    with baked.boot() as vm:
        vm.write_file("/tmp/kept", b"in a full snapshot")
        image = vm.snapshot(tmp_path / "full")
    meta = json.loads((tmp_path / "full" / "metadata.json").read_text())
    assert meta["kind"] == "full" and meta["memory"] is None
    assert not (tmp_path / "full" / "memory").exists()
    with image.boot() as clone:
        assert clone.read_file("/tmp/kept") == b"in a full snapshot"
