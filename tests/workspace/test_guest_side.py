"""guest_side.py's Watcher: the inotify "dirty" flag the guest REPL will use (runs on this
Linux host the same way as in the guest)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supermachine_kernel.workspace import guest_side
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


def test_a_non_root_guest_takes_over_the_files_root_copied_in() -> None:
    """The agent writes pushed files as root; `apply`'s utime step, run as the REPL's user,
    makes them that user's (so a cell can overwrite them) with their mode and the host's
    mtime."""
    import subprocess
    import sys
    import tempfile

    if os.getuid() != 0:
        pytest.skip("needs root to play the agent and switch to another user")
    top = tempfile.TemporaryDirectory(prefix="smk-own-")   # outside pytest's 0700 tmp root
    tmp_path = Path(top.name)
    root = tmp_path / "ws"
    root.mkdir()
    (root / "data.csv").write_text("a,b\n")          # owned by root, like an agent upload
    os.chmod(root / "data.csv", 0o640 | 0o004)
    os.chown(root, 65534, 65534)
    os.chmod(tmp_path, 0o755)
    code = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import guest_side; "
            "os.setgid(65534); os.setuid(65534); "
            "print(json.dumps(guest_side.apply(sys.argv[2], {'utime': [['data.csv', 10**18]]})))")
    here = os.path.dirname(guest_side.__file__)
    out = subprocess.run([sys.executable, "-I", "-c", code, here, str(root)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == '{"failed": []}'
    st = (root / "data.csv").stat()
    assert (st.st_uid, st.st_mode & 0o777, st.st_mtime_ns) == (65534, 0o644, 10**18)
    assert (root / "data.csv").read_text() == "a,b\n"
    assert os.listdir(root) == ["data.csv"]
    top.cleanup()
