"""The notebook snapshot store keeps its folders to their owner (machine/snapshot_store.py)."""
from __future__ import annotations

import os
import stat

from supermachine_kernel.machine.snapshot_store import SnapshotStore


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_folders_are_private_even_under_a_world_readable_home(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    root = home / "share" / "supermachine-kernel" / "snapshots"
    old = os.umask(0o022)
    try:
        group = SnapshotStore(str(root)).notebook("nb-1", "nb.ipynb")
        path = group.reserve("first")
    finally:
        os.umask(old)
    assert os.path.dirname(path) == group.dir
    assert _mode(str(root)) == 0o700
    assert _mode(group.dir) == 0o700


def test_a_store_created_open_is_tightened(tmp_path) -> None:
    root = tmp_path / "snapshots"
    (root / "nb-1").mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)
    os.chmod(root / "nb-1", 0o755)
    group = SnapshotStore(str(root)).notebook("nb-1", "nb.ipynb")
    group.reserve("again")
    assert _mode(str(root)) == 0o700
    assert _mode(group.dir) == 0o700


def _fake_snapshot(nb, name: str, parent: str | None) -> None:
    from supermachine_kernel.machine.snapshot_store import NotebookSnapshot

    path = nb.reserve(name)
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write("{}")
    nb.record(NotebookSnapshot(name=name, created=1.0 if parent is None else 2.0, parent=parent))


def test_rename_moves_the_snapshot_and_its_children_follow(tmp_path) -> None:
    import pytest

    from supermachine_kernel.machine.snapshot_store import StoreError

    nb = SnapshotStore(str(tmp_path / "store")).notebook("nb", "nb.ipynb")
    _fake_snapshot(nb, "a", None)
    _fake_snapshot(nb, "b", "a")
    nb.rename("a", "first")
    assert {e.name: e.parent for e in nb.entries()} == {"first": None, "b": "first"}
    assert not os.path.exists(nb.path("a"))
    with pytest.raises(StoreError, match="already exists"):
        nb.rename("b", "first")
    with pytest.raises(StoreError, match="no snapshot named 'a'"):
        nb.rename("a", "c")
    with pytest.raises(StoreError, match="invalid snapshot name"):
        nb.rename("b", "../escape")
    assert sorted(e.name for e in nb.entries()) == ["b", "first"]
