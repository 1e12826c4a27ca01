"""Issue 16 item 2: the guest's serial console cannot grow host memory or files.

Root in the guest writes megabytes to /dev/ttyS0. The host keeps the last 64 KiB of it in
memory (core/runtime/src/console.rs) for diagnostics, counts the rest, and writes no file for
it: the VM's work dir (RAM-backed, under /dev/shm) and the owner process stay small, and the
last lines written are the ones kept.
"""
from __future__ import annotations

import os

import psutil
import pytest

from supermachine_kernel import api

CONSOLE_CAP = 64 * 1024
WRITE_BYTES = 2 * 1024 * 1024
LINE = 64  # bytes per line the guest writes, newline included

# Writes WRITE_BYTES to the serial port as numbered lines, then a marker line.
WRITER = f"""
import os
fd = os.open("/dev/ttyS0", os.O_WRONLY | os.O_NOCTTY)
line = 0
block = []
for line in range({WRITE_BYTES // LINE}):
    block.append(("serial flood %010d " % line).ljust({LINE - 1}, "x") + "\\n")
    if len(block) == 1024:
        os.write(fd, "".join(block).encode())
        block = []
os.write(fd, "".join(block).encode())
os.write(fd, b"the last line of the flood %d\\n" % line)
os.close(fd)
"""


@pytest.fixture(scope="module")
def vm():
    image = api.Image.build(progress=False)
    vm = image.boot()
    yield vm
    vm.release()


def _workdir_bytes(path: str) -> dict[str, int]:
    """Sizes of the work dir's files, the guest RAM file aside (it is guest memory, capped by
    the VM's size)."""
    sizes = {}
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if name != "ram" and os.path.isfile(p):
            sizes[name] = os.stat(p).st_blocks * 512
    return sizes


def test_a_console_flood_keeps_only_the_last_64_kib(vm):
    written_before, _ = vm.console_sizes()
    rss_before = psutil.Process().memory_info().rss
    r = vm.exec(["python3", "-c", WRITER], timeout_ms=600_000)
    assert r.exit_code == 0, r.stderr.decode(errors="replace")

    written, kept = vm.console_sizes()
    grown = written - written_before
    # Everything the guest wrote reached the host (the tty adds a \r per line) ...
    assert grown >= WRITE_BYTES, (written_before, written)
    # ... and the host kept the cap's worth, ending with the last line.
    assert kept == CONSOLE_CAP
    tail = vm.console_tail()
    assert len(tail.encode()) <= CONSOLE_CAP
    last = WRITE_BYTES // LINE - 1
    assert tail.rstrip("\n").endswith(f"the last line of the flood {last}"), tail[-300:]
    assert f"serial flood {last:010d} " in tail
    assert "serial flood 0000000000 " not in tail

    # No per-VM file grew with it, and the owner process did not keep it either.
    files = _workdir_bytes(vm.workdir)
    assert sum(files.values()) < 256 * 1024, files
    rss_growth = psutil.Process().memory_info().rss - rss_before
    assert rss_growth < WRITE_BYTES // 2, rss_growth
    print(f"\nguest wrote {grown} bytes to ttyS0; host kept {kept}; work dir files {files}; "
          f"owner RSS growth {rss_growth} bytes")


def test_the_console_still_explains_a_dead_vm(vm):
    """The kept tail is what a death reason quotes: after the flood, a line written just before
    QEMU ends is still there once it has exited."""
    r = vm.exec(["sh", "-c", "echo 'goodbye from the guest' > /dev/ttyS0"], timeout_ms=60_000)
    assert r.exit_code == 0
    os.kill(vm.qemu_pid, 9)
    with pytest.raises(Exception) as e:
        vm.exec(["true"], timeout_ms=60_000)
    assert "goodbye from the guest" in str(e.value), str(e.value)[-2000:]
