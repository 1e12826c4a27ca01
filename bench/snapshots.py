"""Benchmark: snapshots, restore and the pool, each figure beside a cold boot measured in the
same run.

Figures:
  restore p50 / p95: process start -> agent answered, and -> first exec answered;
  cycle-restore on release: a pool of max 1 with restore_on_release, release -> next VM ready;
  cache-hit build: Image.build of an already baked image, in a fresh Python process;
  mid-flight snapshot time and size for a guest that touched 200 MiB (template snapshot of a
  cold-booted VM, and full snapshot of a restored clone);
  host Pss per idle VM with 1, 4 and 8 VMs restored from one snapshot.

Run: .venv/bin/python bench/snapshots.py [--restores N] [--touch-mb 200]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import median, percentile, print_table  # noqa: E402

from supermachine_kernel import api  # noqa: E402


def pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def disk_mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restores", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--touch-mb", type=int, default=200)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sm-bench-snap-")
    snaps = os.path.join(work, "snapshots")
    try:
        # cold boot -> first exec (the baseline for every row)
        image = api.Image.build(snapshot=False, progress=True)
        colds = []
        for _ in range(2):
            t = time.perf_counter()
            with image.cold_boot() as vm:
                vm.exec(["true"])
                colds.append(time.perf_counter() - t)
        cold = median(colds)

        t = time.perf_counter()
        baked = api.Image.build(snapshots_dir=snaps, progress=False)
        bake_s = time.perf_counter() - t
        seed = baked.boot()  # the bake VM: not a restore
        seed.release()

        to_agent, to_exec = [], []
        for _ in range(args.restores):
            t = time.perf_counter()
            vm = baked.boot()
            to_agent.append(time.perf_counter() - t)
            vm.exec(["true"])
            to_exec.append(time.perf_counter() - t)
            vm.release()

        pool = baked.pool(min=1, max=1, restore_on_release=True)
        cycles = []
        try:
            pool.acquire().release()  # the first acquire may find the pool still restoring
            for _ in range(args.cycles):
                lease = pool.acquire()
                lease.release()
                t = time.perf_counter()
                with pool.acquire() as vm:
                    vm.exec(["true"])
                cycles.append(time.perf_counter() - t)
        finally:
            pool.shutdown()

        code = (
            "import time; t = time.perf_counter(); from supermachine_kernel import api; "
            f"api.Image.build(snapshots_dir={snaps!r}, progress=False); print(time.perf_counter() - t)"
        )
        hits = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
                for _ in range(3)]

        # a guest that touched N MiB: template snapshot of a cold VM, full snapshot of a clone
        big = api.Image.build(memory_mib=512, snapshot=False, progress=False)
        touch = ["python3", "-c", f"import os; open('/tmp/touched', 'wb').write(os.urandom({args.touch_mb} << 20))"]
        with big.cold_boot() as vm:
            vm.exec(touch)
            t = time.perf_counter()
            tmpl = vm.snapshot(os.path.join(work, "mid-template"))
            tmpl_s = time.perf_counter() - t
        tmpl_mib = disk_mib(tmpl.snapshot)
        with tmpl.boot() as clone:
            clone.exec(["true"])
            t = time.perf_counter()
            full = clone.snapshot(os.path.join(work, "mid-full"))
            full_s = time.perf_counter() - t
        full_mib = disk_mib(full.snapshot)

        pss = {}
        vms = []
        try:
            for n in (1, 4, 8):
                while len(vms) < n:
                    vms.append(baked.boot())
                time.sleep(2)
                pss[n] = sum(pss_mib(v.qemu_pid) for v in vms) / n
        finally:
            for v in vms:
                v.release()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("restore -> agent answered p50", percentile(to_agent, 50), cold, "ms"),
        ("restore -> agent answered p95", percentile(to_agent, 95), cold, "ms"),
        ("restore -> first exec answered p50", percentile(to_exec, 50), cold, "ms"),
        ("restore -> first exec answered p95", percentile(to_exec, 95), cold, "ms"),
        ("cycle-restore on release -> exec p50", median(cycles), cold, "ms"),
        ("cache-hit Image.build (fresh process) p50", median(hits), cold, "ms"),
        ("first build (bake: cold boot + snapshot)", bake_s, cold, "ms"),
        (f"mid-flight snapshot, template, {args.touch_mb} MiB touched", tmpl_s, cold, "ms"),
        (f"mid-flight snapshot, full, {args.touch_mb} MiB touched", full_s, cold, "ms"),
    ]
    print_table("snapshots vs cold boot (ratio = figure / cold boot)", rows, ours="figure", baseline="cold boot")
    print(f"\nsnapshot sizes on disk: template {tmpl_mib:.0f} MiB, full {full_mib:.0f} MiB "
          f"(guest touched {args.touch_mb} MiB of 512)")
    print("host Pss per idle VM restored from one snapshot (cold-booted VM for comparison: see "
          "bench/runtime.py): " + ", ".join(f"{n} VMs {v:.1f} MiB" for n, v in pss.items()))
    print(f"cold boots: {', '.join(f'{c:.2f} s' for c in colds)}")


if __name__ == "__main__":
    main()
