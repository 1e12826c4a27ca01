"""scan.py: the host tree's snapshot, excludes, caps, and what is left out and why."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from supermachine_kernel.workspace.scan import (
    DEFAULT_EXCLUDES,
    DIR,
    FILE,
    BadPath,
    Entry,
    Limits,
    admit,
    check_relpath,
    scan,
)


def reasons(s) -> dict[str, str]:
    return {k.path: k.reason for k in s.skipped}


def test_files_dirs_and_metadata(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_bytes(b"x" * 10)
    os.chmod(tmp_path / "data" / "a.csv", 0o640)
    (tmp_path / "top.txt").write_text("hi")
    s = scan(tmp_path, Limits())
    assert set(s.entries) == {"data", "data/a.csv", "top.txt"}
    a = s.entries["data/a.csv"]
    assert (a.kind, a.size, a.mode) == (FILE, 10, 0o640)
    assert a.mtime_ns == os.stat(tmp_path / "data" / "a.csv").st_mtime_ns
    assert s.entries["data"].kind == DIR
    assert s.skipped == []


def test_default_excludes_and_hidden_dirs(tmp_path: Path) -> None:
    for d in (".ipynb_checkpoints", ".git", "__pycache__", "node_modules", ".venv", "keep"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_text("x")
    (tmp_path / ".hidden_file").write_text("x")
    assert set(scan(tmp_path, Limits()).entries) == {"keep", "keep/f", ".hidden_file"}
    shown = scan(tmp_path, Limits(exclude_hidden_dirs=False)).entries
    assert ".venv/f" in shown and ".git" not in shown


def test_kernel_default_excludes_are_the_scans() -> None:
    from supermachine_kernel.kernel.config import GuestConfig

    assert GuestConfig().workspace_limits().excludes == DEFAULT_EXCLUDES


def test_symlink_is_never_followed(tmp_path: Path) -> None:
    (tmp_path / "passwd").symlink_to("/etc/passwd")
    (tmp_path / "etc").symlink_to("/etc")
    s = scan(tmp_path, Limits())
    assert s.entries == {}
    assert reasons(s) == {"passwd": "symlink", "etc": "symlink"}


def test_fifo_is_skipped_without_opening_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")   # opening it would block the scan
    s = scan(tmp_path, Limits())
    assert reasons(s) == {"pipe": "special"}


def test_sparse_10gb_file_hits_the_size_cap_without_being_read(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(10 * 1000 ** 3)
    (tmp_path / "small").write_text("ok")
    os.chmod(big, 0)   # unreadable: a scan that opened it would fail
    s = scan(tmp_path, Limits(max_file_bytes=1000 ** 3))
    assert set(s.entries) == {"small"}
    assert [(k.path, k.reason, k.size) for k in s.skipped] == [("big.bin", "file_size", 10 * 1000 ** 3)]


def test_total_and_count_caps_keep_the_same_files_in_path_order(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"f{i}").write_bytes(b"x" * 100)
    s = scan(tmp_path, Limits(max_total_bytes=350))
    assert sorted(s.entries) == ["f0", "f1", "f2"]
    assert {r for r in reasons(s).values()} == {"total_bytes"}
    c = scan(tmp_path, Limits(max_files=2))
    assert sorted(c.entries) == ["f0", "f1"] and len(c.skipped) == 4


def test_children_of_a_directory_past_the_count_cap_are_skipped(tmp_path: Path) -> None:
    listing = [("a", Entry(DIR, 0, 1, 0o755)), ("a/x", Entry(FILE, 1, 1, 0o644)),
               ("b", Entry(DIR, 0, 1, 0o755)), ("b/y", Entry(FILE, 1, 1, 0o644))]
    s = admit(listing, Limits(max_files=2))
    assert sorted(s.entries) == ["a", "a/x"]
    assert reasons(s) == {"b": "file_count", "b/y": "file_count"}


def test_undecodable_and_control_names_are_skipped(tmp_path: Path) -> None:
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"bad\xff"))
    (tmp_path / "new\nline").write_text("x")
    s = scan(tmp_path, Limits())
    assert s.entries == {}
    assert sorted(r for r in reasons(s).values()) == ["bad_name", "bad_name"]


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/",
                                 "nul\0byte", "x" * 256, "\ud800", "/".join(["d"] * 65)])
def test_check_relpath_refuses(bad: str) -> None:
    with pytest.raises(BadPath):
        check_relpath(bad)


def test_check_relpath_accepts_unicode_and_spaces() -> None:
    assert check_relpath("données/mon fichier (1).csv") == ("données", "mon fichier (1).csv")


def test_the_walk_stops_past_the_count_cap_and_the_scan_says_it_is_incomplete(tmp_path: Path) -> None:
    for i in range(1050):
        (tmp_path / f"f{i:04d}").write_text("")
    (tmp_path / "zdir").mkdir()
    (tmp_path / "zdir" / "inner").write_text("")
    s = scan(tmp_path, Limits(max_files=20))        # walks at most 20 + EXTRA_ENTRIES (1000)
    assert len(s.entries) == 20 and sorted(s.entries)[-1] == "f0019"   # path order
    assert len(s.skipped) == 1000 and s.unlisted == 1051 - 1020   # 1020 listed, the rest counted
    assert "zdir/inner" not in s.skipped_paths()
    full = scan(tmp_path, Limits(max_files=5000))
    assert full.unlisted == 0 and len(full.entries) == 1052
