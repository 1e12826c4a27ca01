"""Benchmark: snapshots, restore and the VM pool (issue 3), each figure beside cold boot measured
in the same run.

Figures (ratio = snapshot path / cold boot):
  restore p50 / p95        process start -> VM handed out, and -> first exec answered, restoring a
                           warmed snapshot (Image.from_snapshot(path).boot()) vs the same for cold boot
  cycle-restore on release pool(min=max=1, restore_on_release=True): release -> next acquire ready
                           (its first exec answered); also checks the next user does not see a file
                           the previous one wrote
  cache-hit Image.build    Image.build(warmup=..., warmup_tag=..., snapshots_dir=...) again, in this
                           process and in a fresh Python process
  mid-flight snapshot      vm.snapshot(dest) of a cold-booted guest whose spawned process holds
                           200 MiB it wrote (template snapshot), then restore + re-attach to that
                           process by id; and a full snapshot of a restored clone holding the same;
                           sizes on disk (allocated) beside the guest RAM size
  per-VM Pss, 1/4/8 VMs    idle VMs acquired from a pool of one snapshot, Pss from
                           /proc/<vm.qemu_pid>/smaps_rollup, read twice: idle as handed out, and idle
                           after a first exec; vs the same number of cold-booted VMs

The snapshot is baked with warmup `python3 -c "import numpy, pandas"`; the probe exec is `true`.
Goals under TCG (issue 3): restore p50 <= 60 ms, <= 16 MiB Pss per idle VM.
Memory break-down and QEMU option experiments: bench/memory.py.

Run: .venv/bin/python bench/snapshots.py [--restores 20] [--cycles 10] [--cold-boots 5]
     [--counts 1,4,8] [--cold-counts 1,4,8] [--idle 5] [--touch-mib 200] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import median, percentile, print_table  # noqa: E402

from supermachine_kernel.api import Image  # noqa: E402

PROBE = ["true"]
WARMUP_CODE = "import numpy, pandas"
MIB = 1024 * 1024
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# helpers


def warmup(vm: Any) -> None:
    r = vm.exec(["python3", "-c", WARMUP_CODE])
    if r.exit_code != 0:
        raise RuntimeError(f"warmup failed: {r.stderr[-500:]!r}")


def probe(vm: Any) -> None:
    r = vm.exec(PROBE)
    if r.exit_code != 0:
        raise RuntimeError(f"probe {PROBE} failed ({r.exit_code}): {r.stderr[-300:]!r}")


def qemu_pid(vm: Any) -> int:
    pid = getattr(vm, "qemu_pid", None)
    if not pid:
        raise RuntimeError(f"{vm!r} exposes no qemu_pid")
    return int(pid)


def pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def du_mib(path: str) -> tuple[float, float]:
    """(allocated, apparent) MiB of a file or directory tree."""
    alloc = apparent = 0
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        st = os.stat(p)
        alloc += st.st_blocks * 512
        apparent += st.st_size
    return alloc / MIB, apparent / MIB


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def log(msg: str) -> None:
    print(f"[snapshots] {msg}", file=sys.stderr, flush=True)


def start_times(make: Callable[[], Any], n: int) -> tuple[list[float], list[float]]:
    """(start -> VM handed out, start -> first exec answered) for n VMs made one at a time."""
    ready, first = [], []
    for _ in range(n):
        t = time.perf_counter()
        vm = make()
        try:
            ready.append(time.perf_counter() - t)
            probe(vm)
            first.append(time.perf_counter() - t)
        finally:
            vm.release()
    return ready, first


def idle_pss(vms: list, idle: float) -> tuple[float, float]:
    """Mean Pss per VM: (idle as handed out, idle after a first exec)."""
    pids = [qemu_pid(vm) for vm in vms]
    if len(set(pids)) != len(pids):
        raise RuntimeError(f"VMs share a QEMU pid: {pids}")
    time.sleep(idle)
    fresh = sum(pss_mib(p) for p in pids) / len(pids)
    for vm in vms:
        probe(vm)
    time.sleep(idle)
    return fresh, sum(pss_mib(p) for p in pids) / len(pids)


# ---------------------------------------------------------------------------------------------
# figures


def cold_pss(image: Any, n: int, idle: float) -> tuple[float, float]:
    vms = []
    try:
        for _ in range(n):
            vms.append(image.cold_boot())
        return idle_pss(vms, idle)
    finally:
        for vm in vms:
            vm.release()


def pool_pss(image: Any, n: int, idle: float) -> tuple[tuple[float, float], dict]:
    pool = image.pool(min=0, max=n, restore_on_release=True)
    vms = []
    try:
        for _ in range(n):
            vms.append(pool.acquire())
        per_vm = idle_pss(vms, idle)
        return per_vm, pool.stats()
    finally:
        for vm in vms:
            vm.release()
        pool.shutdown()


def cycle_restores(image: Any, n: int) -> list[float]:
    """release -> next acquire ready (first exec answered), pool of one VM restoring on release."""
    pool = image.pool(min=1, max=1, restore_on_release=True)
    out = []
    try:
        vm = pool.acquire()
        probe(vm)
        for _ in range(n):
            vm.exec(["sh", "-c", "echo dirty > /tmp/dirty"])
            t = time.perf_counter()
            vm.release()
            vm = pool.acquire()
            probe(vm)
            out.append(time.perf_counter() - t)
            r = vm.exec(["sh", "-c", "test ! -e /tmp/dirty"])
            if r.exit_code != 0:
                raise RuntimeError("restore_on_release handed out a VM with the previous user's file")
        vm.release()
    finally:
        pool.shutdown()
    return out


def fresh_process_build(image_ref: str | None, snapdir: str) -> float:
    """Cache-hit Image.build timed inside a new Python process (nothing remembered in-process)."""
    code = (
        "import sys, time; sys.path.insert(0, %r); t = time.perf_counter()\n"
        "from supermachine_kernel.api import Image\n"
        "t1 = time.perf_counter()\n"
        "Image.build(%r, progress=False, warmup=lambda vm: None, warmup_tag=%r, snapshots_dir=%r)\n"
        "print(time.perf_counter() - t1)\n"
    ) % (os.path.join(os.path.dirname(__file__), ".."), image_ref, f"bench-{WARMUP_CODE}", snapdir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


TOUCH = """
import sys
n = {mib} << 20
buf = bytearray(b"\\x5a") * n          # written, non-zero pages: nothing a zero-page skip can drop
for i in range(0, n, 4096 * 64):
    buf[i] = (i >> 12) & 0xff
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()                       # stay alive, holding buf, until stdin closes
"""


def spawn_toucher(vm: Any, mib: int) -> Any:
    child = vm.spawn(["python3", "-c", TOUCH.format(mib=mib)])
    got = b""
    deadline = time.monotonic() + 300
    while b"ready" not in got:
        chunk = child.read_stdout(64, timeout=max(0.1, deadline - time.monotonic()))
        if not chunk:
            raise RuntimeError(f"toucher exited early: {child.read_stderr(4096, timeout=1)!r}")
        got += chunk
    return child


def midflight(image: Any, dest_root: str, mib: int) -> dict:
    """Template snapshot of a cold-booted VM holding `mib` MiB in a spawned process; restore it
    and re-attach to that process; then a full snapshot of that restored clone."""
    res: dict = {}
    tmpl_dest = os.path.join(dest_root, f"midflight-template-{os.getpid()}-{time.time_ns()}")
    full_dest = os.path.join(dest_root, f"midflight-full-{os.getpid()}-{time.time_ns()}")
    try:
        vm = image.cold_boot()
        try:
            child = spawn_toucher(vm, mib)
            res["child_id"] = child.id
            res["template_time"], _ = timed(lambda: vm.snapshot(tmpl_dest))
            res["template_alloc_mib"], res["template_apparent_mib"] = du_mib(tmpl_dest)
        finally:
            vm.release()
        t = time.perf_counter()
        vm2 = Image.from_snapshot(tmpl_dest).boot()
        try:
            c2 = vm2.attach_process(res["child_id"])
            res["restore_time"] = time.perf_counter() - t
            # The restored clone's RAM is a private copy-on-write mapping: a full snapshot.
            res["full_time"], _ = timed(lambda: vm2.snapshot(full_dest))
            res["full_alloc_mib"], res["full_apparent_mib"] = du_mib(full_dest)
            c2.close_stdin()
            st = c2.wait(timeout=60)
            res["reattached_exit"] = getattr(st, "exit_code", st)
        finally:
            vm2.release()
    finally:
        shutil.rmtree(tmpl_dest, ignore_errors=True)
        shutil.rmtree(full_dest, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=None, help="guest image ref (default image if omitted)")
    ap.add_argument("--restores", type=int, default=20)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--cold-boots", type=int, default=5)
    ap.add_argument("--counts", default="1,4,8", help="idle VMs from one snapshot, for Pss")
    ap.add_argument("--cold-counts", default="1,4,8", help="idle cold-booted VMs, for Pss ('' = none)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading Pss")
    ap.add_argument("--touch-mib", type=int, default=200)
    ap.add_argument("--midflight-memory", type=int, default=512, help="guest MiB for the mid-flight VM")
    ap.add_argument("--keep", default=None, help="snapshots_dir to use and keep (default: a temp dir)")
    a = ap.parse_args()
    counts = [int(x) for x in a.counts.split(",") if x]
    cold_counts = [int(x) for x in a.cold_counts.split(",") if x]

    snapdir = a.keep or tempfile.mkdtemp(prefix="smk-snapbench-")
    os.makedirs(snapdir, exist_ok=True)
    tag = f"bench-{WARMUP_CODE}"
    try:
        plain = Image.build(a.image, progress=False, snapshot=False)

        log(f"cold boots x{a.cold_boots}")
        cold_ready, cold = start_times(plain.cold_boot, a.cold_boots)

        log("Image.build with warmup (bake; a cache miss unless --keep already holds it)")
        miss_t, baked = timed(lambda: Image.build(a.image, progress=False, warmup=warmup,
                                                  warmup_tag=tag, snapshots_dir=snapdir))
        hit_t, hit = timed(lambda: Image.build(a.image, progress=False, warmup=warmup,
                                               warmup_tag=tag, snapshots_dir=snapdir))
        path = hit.snapshot
        hits_fresh = [fresh_process_build(a.image, snapdir) for _ in range(3)]
        log(f"snapshot at {path}; build miss {miss_t:.2f} s, hit {hit_t * 1e3:.1f} ms, "
            f"hit in a fresh process {median(hits_fresh) * 1e3:.1f} ms")
        # Restores below come from Image.from_snapshot, which has no baking VM to hand out first;
        # dropping `baked` releases the one Image.build kept.
        del baked
        src = Image.from_snapshot(path)

        log(f"restores x{a.restores}")
        rest_ready, rest = start_times(src.boot, a.restores)

        log(f"cycle-restores x{a.cycles}")
        cyc = cycle_restores(src, a.cycles)

        pss_snap, pss_cold, stats = {}, {}, {}
        for n in counts:
            log(f"Pss: {n} idle VMs from the pool")
            pss_snap[n], stats[n] = pool_pss(src, n, a.idle)
        for n in cold_counts:
            log(f"Pss: {n} idle cold-booted VMs")
            pss_cold[n] = cold_pss(plain, n, a.idle)

        log(f"mid-flight snapshots of a guest holding {a.touch_mib} MiB")
        big = Image.build(a.image, progress=False, memory_mib=a.midflight_memory, snapshot=False)
        mf = midflight(big, snapdir, a.touch_mib)

        cold50, cold95 = percentile(cold, 50), percentile(cold, 95)
        rows = [
            ("start -> VM handed out p50", percentile(rest_ready, 50), percentile(cold_ready, 50), "ms"),
            ("start -> VM handed out p95", percentile(rest_ready, 95), percentile(cold_ready, 95), "ms"),
            ("start -> first exec answered p50", percentile(rest, 50), cold50, "ms"),
            ("start -> first exec answered p95", percentile(rest, 95), cold95, "ms"),
            ("cycle-restore on release p50", percentile(cyc, 50), cold50, "ms"),
            ("cycle-restore on release p95", percentile(cyc, 95), cold95, "ms"),
            ("Image.build, snapshot cache hit", hit_t, cold50, "ms"),
            ("Image.build, cache hit, fresh process p50", median(hits_fresh), cold50, "ms"),
            ("Image.build, cache miss (bake + warmup)", miss_t, cold50, "ms"),
            (f"mid-flight snapshot, template ({a.touch_mib} MiB)", mf["template_time"], cold50, "ms"),
            ("  restore it + re-attach to the process", mf["restore_time"], cold50, "ms"),
            ("mid-flight snapshot, full, of that clone", mf["full_time"], cold50, "ms"),
        ]
        print_table("snapshots vs cold boot (time)", rows, "snapshot", "cold boot")
        nan2 = (NAN, NAN)
        rows = []
        for i, when in enumerate(("as handed out", "after 1st exec")):
            rows += [(f"Pss/VM, {n} idle VM{'s' if n > 1 else ''}, {when}", pss_snap.get(n, nan2)[i],
                      pss_cold.get(n, nan2)[i], "MiB") for n in sorted(set(counts) | set(cold_counts))]
        print_table("host memory per idle VM (Pss)", rows, "from snapshot", "cold boot")
        ram = float(a.midflight_memory)
        rows = [("mid-flight template snapshot, allocated", mf["template_alloc_mib"], ram, "MiB"),
                ("mid-flight template snapshot, apparent", mf["template_apparent_mib"], ram, "MiB"),
                ("mid-flight full snapshot, allocated", mf["full_alloc_mib"], ram, "MiB")]
        print_table(f"mid-flight snapshot size ({a.touch_mib} MiB touched)", rows, "snapshot", "guest RAM")
        print(f"\nrestores: n={len(rest)} min {min(rest) * 1e3:.0f} ms, max {max(rest) * 1e3:.0f} ms;"
              f" cold boots: n={len(cold)} median {median(cold):.2f} s")
        print(f"goals (TCG): restore p50 <= 60 ms -> {percentile(rest, 50) * 1e3:.0f} ms to first exec, "
              f"{percentile(rest_ready, 50) * 1e3:.0f} ms to handed out; Pss <= 16 MiB per idle VM -> "
              + ", ".join(f"{n}: {pss_snap[n][1]:.1f}" for n in counts) + " (after 1st exec)")
        print(f"pool stats at {counts[-1]} VMs: {stats.get(counts[-1])}")
        print(f"re-attached toucher exit: {mf.get('reattached_exit')}")
    finally:
        if not a.keep:
            shutil.rmtree(snapdir, ignore_errors=True)


if __name__ == "__main__":
    main()
