"""host_writer.py: guest writes stay inside the workspace, whatever the guest names."""
from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import pytest

from supermachine_kernel.workspace import host_writer
from supermachine_kernel.workspace.host_writer import HostWriter, Refused


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    w = tmp_path / "ws"
    w.mkdir()
    return w


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "secret").write_text("host secret")
    return o


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_write_creates_parents_atomically_with_mode_and_mtime(ws: Path) -> None:
    with HostWriter(ws) as w:
        st = w.write("out/fig/plot.png", io.BytesIO(b"png" * 1000), 0o4755, mtime_ns=123_000_000_000)
    p = ws / "out" / "fig" / "plot.png"
    assert p.read_bytes() == b"png" * 1000
    assert stat.S_IMODE(p.stat().st_mode) == 0o755          # no setuid from the guest
    assert p.stat().st_mtime_ns == 123_000_000_000 == st.st_mtime_ns
    assert listing(ws) == ["out", "out/fig", "out/fig/plot.png"]   # no temp file left


def test_modes_are_never_group_or_world_writable_and_long_names_work(ws: Path) -> None:
    name = "é" * 127          # 254 bytes: the temp file's name must not grow from it
    with HostWriter(ws) as w:
        w.write(name, b"x", 0o777)
        w.mkdir("shared", 0o1777)
    assert stat.S_IMODE((ws / name).stat().st_mode) == 0o755
    assert stat.S_IMODE((ws / "shared").stat().st_mode) == 0o755


def test_replace_keeps_the_old_file_until_the_new_one_is_complete(ws: Path) -> None:
    (ws / "a.csv").write_text("old")
    seen = []

    class Slow(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            seen.append((ws / "a.csv").read_text())
            return super().read(n)

    with HostWriter(ws) as w:
        w.write("a.csv", Slow(b"new"))
    assert seen and set(seen) == {"old"}
    assert (ws / "a.csv").read_text() == "new"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/passwd", "a/./b", "",
                                  "nul\0x", "a//b", "ctl\x1b[31m"])
def test_bad_names_are_refused(ws: Path, name: str) -> None:
    with HostWriter(ws) as w, pytest.raises(Refused):
        w.write(name, b"x")
    assert listing(ws) == []
    assert not (ws.parent / "escape").exists()


def test_symlink_to_etc_passwd_in_the_workspace_is_never_written_through(ws: Path) -> None:
    (ws / "passwd").symlink_to("/etc/passwd")
    before = Path("/etc/passwd").read_bytes()
    with HostWriter(ws) as w:
        with pytest.raises(Refused, match="symlink"):
            w.write("passwd", b"root::0:0::/root:/bin/sh\n")
        with pytest.raises(Refused, match="symlink"):
            w.delete("passwd")
    assert Path("/etc/passwd").read_bytes() == before
    assert (ws / "passwd").is_symlink()


def test_symlinked_directory_on_the_way_is_not_followed(ws: Path, outside: Path) -> None:
    (ws / "data").symlink_to(outside)
    with HostWriter(ws) as w:
        with pytest.raises(Refused, match="not followed"):
            w.write("data/secret", b"overwritten")
        with pytest.raises(Refused, match="not followed"):
            w.write("data/new", b"x")
        with pytest.raises(Refused, match="not followed"):
            w.delete("data/secret")
        with pytest.raises(Refused, match="not followed"):
            w.mkdir("data/sub")
    assert listing(outside) == ["secret"] and (outside / "secret").read_text() == "host secret"


def test_directory_swapped_for_a_symlink_between_scan_and_write_is_refused(ws: Path, outside: Path) -> None:
    (ws / "data").mkdir()
    (ws / "data" / "f").write_text("v1")
    with HostWriter(ws) as w:
        w.write("data/f", b"v2")                     # the scan saw a directory: fine
        os.rename(ws / "data", ws / "data.moved")    # now it is swapped
        (ws / "data").symlink_to(outside)
        with pytest.raises(Refused):
            w.write("data/secret", b"pwned")
    assert (outside / "secret").read_text() == "host secret"
    assert listing(outside) == ["secret"]


def test_fifo_and_directory_at_the_target_are_refused_without_blocking(ws: Path) -> None:
    os.mkfifo(ws / "pipe")
    (ws / "dir").mkdir()
    result: list = []

    def go() -> None:
        with HostWriter(ws) as w:
            for name in ("pipe", "dir"):
                try:
                    w.write(name, b"x")
                except Refused as e:
                    result.append(e.why)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the writer blocked on a FIFO"
    assert len(result) == 2 and "FIFO" in result[0] and "directory" in result[1]
    assert stat.S_ISFIFO(os.lstat(ws / "pipe").st_mode)


def test_over_the_size_cap_nothing_is_written(ws: Path) -> None:
    (ws / "big").write_text("kept")

    class Endless(io.RawIOBase):
        def read(self, n: int = -1) -> bytes:
            return b"z" * (n if n and n > 0 else 4096)

    with HostWriter(ws) as w, pytest.raises(Refused, match="limit"):
        w.write("big", Endless(), max_bytes=10_000)      # stops reading past the cap
    assert (ws / "big").read_text() == "kept"
    assert listing(ws) == ["big"]


def test_delete_files_and_empty_dirs_only(ws: Path) -> None:
    (ws / "d").mkdir()
    (ws / "d" / "f").write_text("x")
    with HostWriter(ws) as w:
        assert w.delete("d") is False              # not empty: kept
        assert w.delete("d/f") is True
        assert w.delete("d") is True
        assert w.delete("d") is False              # already gone
        assert w.delete("no/such/thing") is False
    assert listing(ws) == []


def test_mkdir_through_a_file_is_refused(ws: Path) -> None:
    (ws / "f").write_text("x")
    with HostWriter(ws) as w:
        with pytest.raises(Refused):
            w.mkdir("f")
        with pytest.raises(Refused):
            w.write("f/child", b"x")
    assert (ws / "f").read_text() == "x"


def test_new_files_are_synced_once_at_close_and_replacements_each(ws: Path, monkeypatch) -> None:
    calls: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(host_writer, "_syncfs", lambda fd: calls.append("syncfs"))
    monkeypatch.setattr(host_writer.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    (ws / "old.txt").write_text("old")
    with HostWriter(ws) as w:
        for i in range(3):
            w.write(f"new/{i}.txt", b"new")
        assert calls == []                      # new files: no fsync each
        w.write("old.txt", b"replaced")
        assert calls == ["fsync"]               # a replacement is durable before its rename
    assert calls == ["fsync", "syncfs"]         # the new ones, together, at close
    assert (ws / "new" / "2.txt").read_bytes() == b"new"
    assert (ws / "old.txt").read_bytes() == b"replaced"
    with HostWriter(ws) as w:
        w.write("old.txt", b"again")
    assert calls == ["fsync", "syncfs", "fsync"]    # nothing new: no syncfs
