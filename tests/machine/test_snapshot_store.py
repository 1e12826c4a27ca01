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
