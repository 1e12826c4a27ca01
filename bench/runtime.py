"""Benchmark: the VM runtime, each figure beside a host baseline measured in the same run.

Figures:
  cold boot -> first exec result, and the same restoring the image's snapshot (vs. starting
  `python3 -c 'print(1 + 1)'` on the host);
  exec round trip of `true`, p50 / p95 (vs. subprocess.run(["true"]) on the host);
  stream throughput MB/s of `head -c N /dev/zero` read from a spawned process (vs. the same
  command through a host pipe);
  file transfer MB/s, host -> guest and guest -> host (vs. copying the file on the host).

Run: .venv/bin/python bench/runtime.py [--rounds N] [--stream-mb 200] [--file-mb 64]
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


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def drain(child) -> int:
    n = 0
    while chunk := child.read_stdout(1 << 20):
        n += len(chunk)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50, help="exec round trips to time")
    ap.add_argument("--boots", type=int, default=3, help="cold boots to time")
    ap.add_argument("--stream-mb", type=int, default=200)
    ap.add_argument("--file-mb", type=int, default=64)
    args = ap.parse_args()

    image = api.Image.build(progress=True)
    print(f"image {image.name} ({image.hash}), accelerator {api._core.detect_accel()}", flush=True)

    # cold boot -> first exec answered (and the same from the image's snapshot)
    boots, restores, host_starts = [], [], []
    for _ in range(args.boots):
        for boot, out in ((image.cold_boot, boots), (image.boot, restores)):
            t = time.perf_counter()
            vm = boot()
            r = vm.exec(["python3", "-c", "print(1 + 1)"])
            out.append(time.perf_counter() - t)
            assert r.stdout == b"2\n", r
            vm.release()
        host_starts.append(timed(subprocess.run, [sys.executable, "-c", "print(1 + 1)"], capture_output=True))

    vm = image.boot()
    try:
        vm.exec(["true"])  # warm the page cache
        execs = [timed(vm.exec, ["true"]) for _ in range(args.rounds)]
        host_execs = [timed(subprocess.run, ["true"]) for _ in range(args.rounds)]

        n = args.stream_mb * 1024 * 1024
        child = vm.spawn(["head", "-c", str(n), "/dev/zero"])
        t = time.perf_counter()
        got = drain(child)
        stream_s = time.perf_counter() - t
        assert got == n and child.wait().exit_code == 0
        t = time.perf_counter()
        p = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
        host_got = 0
        while chunk := p.stdout.read1(1 << 20):
            host_got += len(chunk)
        p.wait()
        host_stream_s = time.perf_counter() - t

        fsize = args.file_mb * 1024 * 1024
        tmp = tempfile.mkdtemp(prefix="sm-bench-")
        try:
            src = os.path.join(tmp, "src.bin")
            with open(src, "wb") as f:
                f.write(os.urandom(fsize))
            up_s = timed(vm.upload, src, "/tmp/bench.bin")
            down_s = timed(vm.download, "/tmp/bench.bin", os.path.join(tmp, "back.bin"))
            host_cp_s = timed(shutil.copyfile, src, os.path.join(tmp, "copy.bin"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        vm.release()

    mb = 1e6
    rows = [
        ("cold boot -> `python3 -c` answered (p50)", median(boots), median(host_starts), "ms"),
        ("restore -> `python3 -c` answered (p50)", median(restores), median(host_starts), "ms"),
        ("exec `true` round trip p50", percentile(execs, 50), percentile(host_execs, 50), "ms"),
        ("exec `true` round trip p95", percentile(execs, 95), percentile(host_execs, 95), "ms"),
        (f"stream {args.stream_mb} MiB stdout", n / stream_s / mb, host_got / host_stream_s / mb, "MB/s"),
        (f"file {args.file_mb} MiB host -> guest", fsize / up_s / mb, fsize / host_cp_s / mb, "MB/s"),
        (f"file {args.file_mb} MiB guest -> host", fsize / down_s / mb, fsize / host_cp_s / mb, "MB/s"),
    ]
    print_table(
        "VM runtime (ratio = microVM / host)",
        rows,
        ours="microVM",
        baseline="host",
        higher_is_better={r[0] for r in rows if r[3] == "MB/s"},
    )
    print(f"\ncold boots: {', '.join(f'{b:.2f} s' for b in boots)}; restores: "
          f"{', '.join(f'{b:.2f} s' for b in restores)}; baselines: host python3 start, "
          "host subprocess, host pipe, host file copy")


if __name__ == "__main__":
    main()
