"""guest_side.py's Watcher: the inotify "dirty" flag the guest REPL will use (runs on this
Linux host the same way as in the guest)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supermachine_kernel.workspace.guest_side import Watcher


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Watcher]]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "f").write_text("x")
    w = Watcher(str(tmp_path), [".git", "__pycache__"], True)
    assert w.dirty() is False
    yield tmp_path, w
    w.close()


def test_nothing_changed_is_clean(watched) -> None:
    _, w = watched
    assert w.dirty() is False and w.dirty() is False


@pytest.mark.parametrize("change", [
    lambda r: (r / "new").write_text("x"),
    lambda r: (r / "f").write_text("changed"),
    lambda r: (r / "f").unlink(),
    lambda r: os.rename(r / "f", r / "g"),
    lambda r: os.chmod(r / "f", 0o600),
    lambda r: (r / "sub" / "deep").write_text("x"),
    lambda r: (r / "sub").rename(r / "moved"),
])
def test_a_change_makes_it_dirty_once(watched, change) -> None:
    root, w = watched
    change(root)
    assert w.dirty() is True
    assert w.dirty() is False


def test_new_directories_are_watched_and_excludes_ignored(watched) -> None:
    root, w = watched
    (root / "a" / "b").mkdir(parents=True)
    assert w.dirty() is True
    (root / "a" / "b" / "c.txt").write_text("x")
    assert w.dirty() is True
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.pyc").write_bytes(b"x")
    (root / ".git").mkdir()
    (root / ".venv").mkdir()
    (root / ".venv" / "x").write_text("x")
    assert w.dirty() is False


def test_without_inotify_it_is_always_dirty(tmp_path: Path) -> None:
    w = Watcher(str(tmp_path), [], True)
    w.close()
    assert w.dirty() is True
