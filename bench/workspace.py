"""Benchmark: the workspace sync engine (supermachine_kernel/workspace/) against a real microVM.

Figures, one VM, one run:
  a pass with nothing changed: the host scan alone, the guest listing (one agent exec of
  python3), and before_cell + after_cell together (no REPL attached: each pass lists the guest
  with a process), p50 over --passes runs, for a workspace of --files small files;
  a --mb MB dataset host -> guest: `before_cell` (listing + upload + mtime apply) beside a raw
  `Vm.upload` of the same file (the baseline);
  --mb MB written by the guest -> host, --rounds rounds, side by side: `pull` through the
  agent's limited read (what the sync uses), `pull` through the older guest `read` process
  (what it uses with an agent that predates limited reads), and a raw `Vm.download` (baseline,
  no checks, no fsync; `pull` writes through HostWriter: temp file, fsync, rename); median and
  best of the rounds (the machine is shared: the best is the least disturbed); plus
  `after_cell` (listing + pull) once.

The kernel-level figures (`1+1` with the workspace on vs off; kernel launch -> a 100 MB file
readable in the guest) are in bench/kernel.py --only workspace.

Run: .venv/bin/python bench/workspace.py [--mb 100] [--files 50] [--passes 15] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from supermachine_kernel import api
from supermachine_kernel.workspace.host_writer import HostWriter
from supermachine_kernel.workspace.plan import TO_HOST, plan
from supermachine_kernel.workspace.scan import Limits, Scan, scan
from supermachine_kernel.workspace.sync import WorkspaceSync
from supermachine_kernel.workspace.transfer import list_guest, pull

GUEST_ROOT = "/tmp/bench-workspace"


class OlderAgent:
    """The same VM, seen as one whose agent predates limited reads (pull's fallback path)."""
    agent_features: list[str] = []

    def __init__(self, vm: api.Vm) -> None:
        self._vm = vm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)


def p50_ms(f, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--passes", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    nbytes = a.mb * 1000 * 1000
    limits = Limits(max_file_bytes=(a.mb + 1) * 1024 * 1024, max_total_bytes=3 * (a.mb + 1) * 1024 * 1024)
    with tempfile.TemporaryDirectory() as d:
        host = Path(d) / "ws"
        host.mkdir()
        for i in range(a.files):
            (host / f"f{i:03d}.txt").write_text("x" * 1000)
        vm = api.Image.build(progress=False).boot()
        try:
            print(f"accel: {vm.accel}; agent features: {vm.agent_features}; workspace of {a.files} files")
            vm.exec(["sh", "-c", f"rm -rf {GUEST_ROOT}; mkdir -p {GUEST_ROOT}"])
            ws = WorkspaceSync(host, GUEST_ROOT, "sync", limits)
            ws.before_cell(vm)
            print(f"host scan, nothing changed:            p50 {p50_ms(lambda: scan(host, limits), a.passes):8.2f} ms")
            print(f"guest listing (agent exec), unchanged: p50 {p50_ms(lambda: list_guest(vm, GUEST_ROOT, limits), a.passes):8.2f} ms")
            print(f"before_cell + after_cell, unchanged:   p50 {p50_ms(lambda: (ws.before_cell(vm), ws.after_cell(vm)), a.passes):8.2f} ms")

            # host -> guest
            data = host / "dataset.bin"
            with open(data, "wb") as f:
                f.write(os.urandom(nbytes))
            up = timed(lambda: ws.before_cell(vm))
            size = int(vm.exec(["stat", "-c", "%s", f"{GUEST_ROOT}/dataset.bin"]).stdout)
            assert size == nbytes, size
            vm.exec(["rm", "-f", f"{GUEST_ROOT}/dataset.bin"])   # the guest's tmpfs is small
            raw_up = timed(lambda: vm.upload(data, "/tmp/raw.bin"))
            vm.exec(["rm", "-f", "/tmp/raw.bin"])
            print(f"{a.mb} MB host -> guest: before_cell {up:6.2f} s | raw Vm.upload {raw_up:6.2f} s"
                  f" | ratio {up / raw_up:4.2f}")
            data.unlink()
            ws.after_cell(vm)          # the guest's delete of dataset.bin, carried over

            # guest -> host: the guest writes --mb MB; three ways to bring it over, same file
            r = vm.exec(["sh", "-c", f"head -c {nbytes} /dev/urandom > {GUEST_ROOT}/out.bin"])
            assert r.exit_code == 0, r.stderr
            guest = list_guest(vm, GUEST_ROOT, limits)
            only_out = Scan({"out.bin": guest.entries["out.bin"]})
            p = plan({}, Scan(), only_out, TO_HOST)
            assert p.to_host == ["out.bin"], p
            series: dict[str, list[float]] = {"pull (agent limited read)": [],
                                              "pull (guest read process)": [],
                                              "raw Vm.download": []}
            for _ in range(a.rounds):
                for name, who in (("pull (agent limited read)", vm),
                                  ("pull (guest read process)", OlderAgent(vm))):
                    dest = Path(d) / "pulled"
                    dest.mkdir(exist_ok=True)
                    with HostWriter(dest) as w:
                        t = time.perf_counter()
                        got = pull(who, w, GUEST_ROOT, p, only_out, limits)
                        series[name].append(time.perf_counter() - t)
                    assert got.copied == ["out.bin"] and not got.refused, got
                    assert (dest / "out.bin").stat().st_size == nbytes
                    (dest / "out.bin").unlink()
                series["raw Vm.download"].append(timed(lambda: vm.download(f"{GUEST_ROOT}/out.bin", Path(d) / "raw.bin")))
                (Path(d) / "raw.bin").unlink()
            base, base_min = statistics.median(series["raw Vm.download"]), min(series["raw Vm.download"])
            for name, xs in series.items():
                med = statistics.median(xs)
                print(f"{a.mb} MB guest -> host, {name:27s}: median {med:5.2f} s, best {min(xs):5.2f} s "
                      f"(runs {', '.join(f'{x:.2f}' for x in xs)}) | vs raw: median {med / base:4.2f}, "
                      f"best {min(xs) / base_min:4.2f}")
            down = timed(lambda: ws.after_cell(vm))
            assert (host / "out.bin").stat().st_size == nbytes
            print(f"{a.mb} MB written by the guest -> host (after_cell: listing + pull): {down:6.2f} s")
        finally:
            vm.release()


if __name__ == "__main__":
    main()
