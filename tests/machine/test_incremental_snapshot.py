"""Incremental snapshots (core/runtime/src/snapshot/delta.rs through `Vm.snapshot_incremental`),
what idle suspend (machine/idle.py) takes: real microVMs restored from a template, the
snapshot keeps only the RAM pages that differ from it, restores over it (or over its pinned
link to the base's memory file when the base was deleted or replaced), and without that pin
refuses a base that is gone or replaced with a message naming it.

Module-scoped: one base snapshot of our own (so it can be deleted and replaced), VMs restored
from it.
"""
from __future__ import annotations

import os
import shutil

import pytest

from supermachine_kernel import _core, api
from supermachine_kernel.machine.idle import disk_usage



@pytest.fixture(scope="module")
def base(image, tmp_path_factory) -> str:
    """A template snapshot of our own (a VM restored from the warm one, snapshotted)."""
    root = tmp_path_factory.mktemp("incremental")
    with image.boot() as vm:
        vm.write_file("/root/base-marker", b"from the base")
        path = str(root / "base")
        vm.snapshot(path)
    return path


def test_incremental_snapshot_restores_files_processes_and_memory(base, tmp_path) -> None:
    with api.Image.from_snapshot(base).boot() as vm:
        data = os.urandom(3 << 20)  # 3 MiB of guest tmpfs pages that differ from the base
        vm.write_file("/root/new.bin", data)
        sleeper = vm.spawn(["sleep", "100000"])
        full = str(tmp_path / "full")
        inc = str(tmp_path / "inc")
        vm.snapshot(full)
        vm.snapshot_incremental(inc)
        meta = _core.snapshot_info(inc)
        assert meta["kind"] == "incremental", meta
        assert meta["base"]["dir"] == os.path.realpath(base), meta["base"]
        assert not os.path.exists(os.path.join(inc, "memory"))
        full_size, inc_size = disk_usage(full), disk_usage(inc)  # the pin is the base's
        # The incremental one holds the changed pages (the 3 MiB file among them), not the
        # whole RAM the full one holds.
        assert 3 << 20 < inc_size < full_size / 3, (inc_size, full_size)
    with api.Image.from_snapshot(inc).boot() as clone:
        assert clone.read_file("/root/new.bin") == data
        assert clone.read_file("/root/base-marker") == b"from the base"
        assert sleeper.id in [p["id"] for p in clone.processes() if p["running"]]
        assert clone.exec(["python3", "-c", "print(6 * 7)"]).stdout == b"42\n"
        # Snapshotted again: the base is still the template, not the incremental snapshot.
        again = str(tmp_path / "again")
        clone.snapshot_incremental(again)
        assert _core.snapshot_info(again)["base"]["dir"] == os.path.realpath(base)
    with api.Image.from_snapshot(again).boot() as third:
        assert third.read_file("/root/new.bin") == data


def test_a_base_gone_or_replaced_is_refused_with_its_name(image, base, tmp_path) -> None:
    own_base = str(tmp_path / "own-base")  # a base of our own, to delete and replace
    with api.Image.from_snapshot(base).boot() as vm:
        vm.snapshot(own_base)
    with api.Image.from_snapshot(own_base).boot() as vm:
        vm.write_file("/root/x", b"x")
        inc = str(tmp_path / "inc")
        vm.snapshot_incremental(inc)
        # Another snapshot moved in under the base's name while the VM runs: no incremental
        # snapshot against it (the VM runs on; a full one still works).
        other = str(tmp_path / "other")
        with image.boot() as vm2:
            vm2.write_file("/root/other", b"other")
            vm2.snapshot(other)
        aside = str(tmp_path / "own-base-old")
        os.rename(own_base, aside)
        os.rename(other, own_base)
        with pytest.raises(api.SnapshotError, match="replaced since the VM started"):
            vm.snapshot_incremental(str(tmp_path / "inc2"))
        assert not os.path.exists(tmp_path / "inc2")
        assert vm.exec(["cat", "/root/x"]).stdout == b"x"
    # The snapshot pinned its base's memory file (a hard link, same filesystem here): the
    # base deleted or replaced loses nothing.
    assert _core.snapshot_info(inc)["base"]["pinned"]
    shutil.rmtree(aside)
    with api.Image.from_snapshot(inc).boot() as vm:
        assert vm.read_file("/root/x") == b"x"
    # Without the pin (a base on another filesystem, or owned by another user), a base
    # replaced or gone is refused, naming it.
    os.unlink(os.path.join(inc, "base-memory"))
    with pytest.raises(api.SnapshotError, match="was replaced by another snapshot") as e:
        api.Image.from_snapshot(inc).boot()
    assert os.path.realpath(own_base) in str(e.value)
    shutil.rmtree(own_base)
    with pytest.raises(api.SnapshotError, match="its base snapshot .* is gone"):
        api.Image.from_snapshot(inc).boot()
