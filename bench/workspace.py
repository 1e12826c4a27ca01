"""Benchmark: the workspace sync engine (supermachine_kernel/workspace/) against a real microVM.

Figures:
  a pass with nothing changed: the host scan alone, the guest listing (one agent exec of
  python3), and before_cell + after_cell together, p50 over --passes runs, for a workspace
  of --files small files;
  a --mb MB dataset host -> guest (before_cell after the file appears on the host);
  --mb MB written by the guest -> host (after_cell after the guest wrote it).

Not yet the kernel's `1+1` with the workspace on vs off (the sync is not wired into the kernel;
bench/kernel.py gets that series when it is).

Run: .venv/bin/python bench/workspace.py [--mb 100] [--files 50] [--passes 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from supermachine_kernel import api
from supermachine_kernel.workspace.scan import Limits, scan
from supermachine_kernel.workspace.sync import WorkspaceSync
from supermachine_kernel.workspace.transfer import list_guest

GUEST_ROOT = "/tmp/bench-workspace"


def p50_ms(f, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--passes", type=int, default=15)
    a = ap.parse_args()
    limits = Limits(max_file_bytes=(a.mb + 1) * 1024 * 1024, max_total_bytes=3 * (a.mb + 1) * 1024 * 1024)
    with tempfile.TemporaryDirectory() as d:
        host = Path(d)
        for i in range(a.files):
            (host / f"f{i:03d}.txt").write_text("x" * 1000)
        vm = api.Image.build(progress=False).boot()
        try:
            vm.exec(["sh", "-c", f"rm -rf {GUEST_ROOT}; mkdir -p {GUEST_ROOT}"])
            ws = WorkspaceSync(host, GUEST_ROOT, "sync", limits)
            ws.before_cell(vm)
            print(f"accel: {vm.accel}; workspace of {a.files} files")
            print(f"host scan, nothing changed:            p50 {p50_ms(lambda: scan(host, limits), a.passes):8.2f} ms")
            print(f"guest listing (agent exec), unchanged: p50 {p50_ms(lambda: list_guest(vm, GUEST_ROOT, limits), a.passes):8.2f} ms")
            print(f"before_cell + after_cell, unchanged:   p50 {p50_ms(lambda: (ws.before_cell(vm), ws.after_cell(vm)), a.passes):8.2f} ms")

            data = host / "dataset.bin"
            with open(data, "wb") as f:
                f.write(os.urandom(a.mb * 1000 * 1000))
            t = time.perf_counter()
            msg = ws.before_cell(vm)
            up = time.perf_counter() - t
            assert not msg, msg
            size = int(vm.exec(["stat", "-c", "%s", f"{GUEST_ROOT}/dataset.bin"]).stdout)
            assert size == a.mb * 1000 * 1000, size
            print(f"{a.mb} MB dataset host -> guest (before_cell): {up:6.2f} s  ({a.mb / up:.0f} MB/s)")

            # The guest's writable layer is tmpfs at half its RAM (111 MB for Image.build's
            # default 256 MiB guest): the cell deletes the dataset before writing its output.
            r = vm.exec(["sh", "-c", f"rm {GUEST_ROOT}/dataset.bin && "
                         f"head -c {a.mb * 1000 * 1000} /dev/urandom > {GUEST_ROOT}/out.bin"])
            assert r.exit_code == 0, r.stderr
            t = time.perf_counter()
            msg = ws.after_cell(vm)
            down = time.perf_counter() - t
            assert not msg, msg
            assert (host / "out.bin").stat().st_size == a.mb * 1000 * 1000
            assert not data.exists()
            print(f"{a.mb} MB written by the guest -> host (after_cell): {down:6.2f} s  ({a.mb / down:.0f} MB/s)")
        finally:
            vm.release()


if __name__ == "__main__":
    main()
