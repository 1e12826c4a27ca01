"""Limited guest file reads (`Vm.download`/`read_file` with `max_bytes` / `follow_symlinks`):
regular files only, a final symlink refused unless followed, the size cap held; on both
backends (the agent over a unix socket, and a real microVM)."""
from __future__ import annotations

import os
import uuid

import pytest

from supermachine_kernel.api import GuestError


@pytest.fixture
def tree(vm):
    """A guest directory holding a 4-byte file, a FIFO, a symlink to it, one to /dev/zero."""
    d = f"/tmp/read-limits-{uuid.uuid4().hex[:8]}"
    r = vm.exec(["sh", "-c", f"mkdir -p {d} && cd {d} && printf 1234 > four && mkfifo fifo "
                 "&& ln -s four link && ln -s /dev/zero zero && ln -s fifo fifolink"])
    assert r.exit_code == 0, r.stderr
    yield d
    vm.exec(["rm", "-rf", d])


def test_the_agent_announces_limited_reads(vm):
    assert "read_limits" in vm.agent_features


def test_a_file_within_the_cap_is_read_whole(vm, tree, tmp_path):
    dest = tmp_path / "four"
    assert vm.download(f"{tree}/four", dest, max_bytes=4, follow_symlinks=False) == 4
    assert dest.read_bytes() == b"1234"
    assert vm.read_file(f"{tree}/four", max_bytes=4) == b"1234"


def test_a_file_past_the_cap_is_refused_and_nothing_is_written(vm, tree, tmp_path):
    dest = tmp_path / "four"
    with pytest.raises(GuestError, match="3-byte limit") as e:
        vm.download(f"{tree}/four", dest, max_bytes=3)
    assert e.value.kind == "limit"
    assert not dest.exists() and os.listdir(tmp_path) == []


def test_a_file_that_streams_past_the_cap_is_cut(vm):
    # /proc files announce size 0: the cap is held while streaming.
    with pytest.raises(GuestError, match="50-byte limit"):
        vm.read_file("/proc/self/status", max_bytes=50)
    assert len(vm.read_file("/proc/self/status")) > 50


@pytest.mark.parametrize("name,words", [("fifo", "FIFO"), ("link", "symlink"),
                                        ("zero", "symlink"), ("fifolink", "symlink")])
def test_special_files_and_symlinks_are_refused_without_blocking(vm, tree, tmp_path, name, words):
    with pytest.raises(GuestError, match=words):
        vm.download(f"{tree}/{name}", tmp_path / "out", max_bytes=1 << 20, follow_symlinks=False)
    assert os.listdir(tmp_path) == []


def test_followed_symlinks_still_reach_only_regular_files(vm, tree, tmp_path):
    assert vm.download(f"{tree}/link", tmp_path / "l", follow_symlinks=True,
                       max_bytes=10) == 4
    for name, words in [("zero", "device"), ("fifolink", "FIFO")]:
        with pytest.raises(GuestError, match=words):
            vm.read_file(f"{tree}/{name}", max_bytes=10, follow_symlinks=True)


def test_unlimited_reads_keep_the_old_behaviour(vm, tree, tmp_path):
    assert vm.download(f"{tree}/link", tmp_path / "l") == 4
    assert (tmp_path / "l").read_bytes() == b"1234"


def test_download_into_a_file_descriptor(vm, tree, tmp_path):
    path = tmp_path / "fd"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b">")
        assert vm.download(f"{tree}/four", fd, max_bytes=4, follow_symlinks=False) == 4
        os.write(fd, b"<")
    finally:
        os.close(fd)
    assert path.read_bytes() == b">1234<"
    with pytest.raises(ValueError, match="file descriptor"):
        vm.download(f"{tree}/four", -1)
