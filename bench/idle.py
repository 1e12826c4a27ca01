"""Benchmark: idle suspend of the "Python (microVM)" kernel (machine/idle.py), same run, one kernel.

A kernel started with `--MicroVMKernel.idle_suspend_after=IDLE` (the installed kernelspec, so
the default pool settings), holding the warm snapshot's state plus what --state-mib adds (a
numpy array of random bytes, so none of it is a zero page). Each round:
  - "normal cell": `1+1` round trips (execute_request -> idle) while the VM runs, median of 5;
  - memory while running: Pss of the kernel process and of its QEMU processes (/proc/PID/
    smaps_rollup), and how many QEMU processes there are (the kernel's VM, a pool VM);
  - the kernel is left alone until its QEMU processes are gone (suspended): Pss again, and
    the suspend snapshot's size on disk;
  - "first cell after suspend": one `1+1` round trip, which resumes the VM; the state is
    checked after it;
  - then once more suspended, a kernel_info_request (what a frontend sends when it connects)
    resumes the VM in the background; "first cell after a kernel_info": a `1+1` round trip
    --think seconds after the kernel_info reply (a user reading the notebook first).
The table puts the first cell after a suspend beside a normal cell of the same round (ratio),
and memory while suspended beside memory while running. This runs once per suspend snapshot
kind (--modes; a kernel each, one after the other): "incremental" (the default: the RAM pages
that differ from the warm snapshot) and "full" (SUPERMACHINE_IDLE_SNAPSHOT=full: every non-zero
page); a last table puts the two side by side: snapshot size, the time to take it (as the
kernel's %vm reports it), the first cell after the suspend.

The kernel runs in an empty working directory unless --cwd names one: with the workspace sync
on (the default), its files are in the guest's RAM and so in every suspend snapshot.

Run: .venv/bin/python bench/idle.py [--rounds 5] [--idle 3] [--state-mib 0] [--kernel NAME]
     [--cwd DIR] [--think 3] [--modes incremental,full] [--verbose]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import median, print_table  # noqa: E402

from jupyter_client.manager import KernelManager  # noqa: E402
import psutil  # noqa: E402

from supermachine_kernel.machine.idle import disk_usage  # noqa: E402


def run_cell(kc, code: str, timeout: float = 300.0) -> tuple[float, dict, list[dict]]:
    """(seconds from execute_request to its idle status, execute_reply content, outputs)."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    outputs: list[dict] = []
    deadline = t0 + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.01, deadline - time.perf_counter()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            took = time.perf_counter() - t0
            break
        outputs.append(msg)
    while True:
        reply = kc.get_shell_msg(timeout=max(0.01, deadline - time.perf_counter()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return took, reply["content"], outputs


def result_of(outputs: list[dict]) -> str:
    for m in outputs:
        if m["msg_type"] == "execute_result":
            return m["content"]["data"]["text/plain"]
    return ""


def qemu_pids(kernel_pid: int) -> list[int]:
    """The live QEMU processes under the kernel process (a killed QEMU its parent has not
    reaped yet does not count)."""
    try:
        procs = psutil.Process(kernel_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in procs:
        try:
            if p.name().startswith("qemu-system") and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def pss_mib(pids: list[int], field: str = "Pss") -> float:
    """Sum of smaps_rollup's `field` (Pss; Pss_Anon: the private pages, which only swap could
    take back; Pss_File: file pages, which the host can drop when clean) in MiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def disk_mib(path: str) -> float:
    return disk_usage(path) / 2**20


def wait_suspended(kpid: int, suspended_dir: str) -> float:
    """Seconds until the kernel's QEMU processes are gone and its suspend snapshot exists."""
    t0 = time.monotonic()
    while qemu_pids(kpid) or not os.path.isdir(suspended_dir) or not os.listdir(suspended_dir):
        if time.monotonic() - t0 > 600:
            raise SystemExit("the kernel did not suspend within 600 s")
        time.sleep(0.1)
    return time.monotonic() - t0


ROWS = ("normal", "first", "qemu_run", "qemu_anon", "qemu_susp", "kernel_run", "kernel_susp",
        "disk", "n_qemu_run", "wait", "after_info", "snap_s")


def measure(args: argparse.Namespace, mode: str) -> dict[str, list[float]]:
    """The rounds of one kernel whose idle suspend takes `mode` snapshots ("incremental": the
    default, against the warm snapshot; "full": SUPERMACHINE_IDLE_SNAPSHOT=full)."""
    data = tempfile.mkdtemp(prefix="bench-idle-")
    suspended_dir = os.path.join(data, "supermachine-kernel", "suspended")
    km = KernelManager(kernel_name=args.kernel)
    # An empty working directory: with the workspace sync on (the default), the kernel's cwd is
    # copied into the guest's RAM, and would be inside every suspend snapshot.
    cwd = args.cwd or tempfile.mkdtemp(prefix="bench-idle-cwd-")
    env = dict(os.environ, JUPYTER_DATA_DIR=data)
    env.pop("SUPERMACHINE_IDLE_SNAPSHOT", None)
    if mode == "full":
        env["SUPERMACHINE_IDLE_SNAPSHOT"] = "full"
    km.start_kernel(extra_arguments=[f"--MicroVMKernel.idle_suspend_after={args.idle}",
                                     *(["--log-level=INFO"] if args.verbose else [])],
                    env=env, cwd=cwd)
    kc = km.client()
    kc.start_channels()
    rows: dict[str, list[float]] = {k: [] for k in ROWS}
    try:
        kc.wait_for_ready(timeout=300)
        setup = "import os\nmarker = 'kept'\n"
        if args.state_mib:
            setup += f"blob = os.urandom({args.state_mib} * 2**20)\n"
        _, reply, _ = run_cell(kc, setup)
        assert reply["status"] == "ok", reply
        kpid = km.provisioner.process.pid  # type: ignore[union-attr]
        for r in range(args.rounds):
            normal = [run_cell(kc, "1+1")[0] for _ in range(5)]
            time.sleep(0.5)
            running = qemu_pids(kpid)
            rows["qemu_run"].append(pss_mib(running))
            rows["qemu_anon"].append(pss_mib(running, "Pss_Anon"))
            rows["kernel_run"].append(pss_mib([kpid]))
            rows["n_qemu_run"].append(len(running))
            rows["wait"].append(wait_suspended(kpid, suspended_dir))
            rows["qemu_susp"].append(pss_mib(qemu_pids(kpid)))
            rows["kernel_susp"].append(pss_mib([kpid]))
            rows["disk"].append(disk_mib(suspended_dir))
            kinds = [json.load(open(os.path.join(suspended_dir, n, "metadata.json")))["kind"]
                     for n in os.listdir(suspended_dir)]
            # A full suspend snapshot is a template one (RAM split into its memory file).
            assert kinds == [{"full": "template"}.get(mode, mode)], (kinds, mode)
            first, reply, outputs = run_cell(kc, "1+1")
            assert reply["status"] == "ok" and result_of(outputs) == "2", (reply, outputs)
            _, reply, outputs = run_cell(kc, "marker")
            assert result_of(outputs) == "'kept'", outputs
            _, reply, outputs = run_cell(kc, "%vm")
            facts = "".join(m["content"].get("text", "") for m in outputs
                            if m["msg_type"] == "stream")
            took = re.search(r"last snapshot \w+, [\d.]+ MiB, ([\d.]+) s", facts)
            rows["snap_s"].append(float(took.group(1)) if took else float("nan"))
            rows["first"].append(first)
            rows["normal"].append(median(normal))
            wait_suspended(kpid, suspended_dir)
            msg_id = kc.kernel_info()
            while kc.get_shell_msg(timeout=300)["parent_header"].get("msg_id") != msg_id:
                pass
            time.sleep(args.think)
            rows["after_info"].append(run_cell(kc, "1+1")[0])
            print(f"{mode} round {r + 1}: first cell after suspend {first * 1000:.0f} ms, normal "
                  f"{median(normal) * 1000:.0f} ms, after a kernel_info "
                  f"{rows['after_info'][-1] * 1000:.0f} ms; QEMU Pss {rows['qemu_run'][-1]:.1f} MiB "
                  f"(anon {rows['qemu_anon'][-1]:.1f}; {len(running)} processes; its VM "
                  f"{'from the warm snapshot' if r == 0 else 'resumed'}) -> "
                  f"{rows['qemu_susp'][-1]:.1f} MiB; kernel "
                  f"process {rows['kernel_run'][-1]:.1f} -> {rows['kernel_susp'][-1]:.1f} MiB; "
                  f"{mode} snapshot {rows['disk'][-1]:.1f} MiB on disk, taken in "
                  f"{rows['snap_s'][-1] * 1000:.0f} ms; suspended "
                  f"{rows['wait'][-1]:.1f} s after the cell", flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
        shutil.rmtree(data, ignore_errors=True)
        if not args.cwd:
            shutil.rmtree(cwd, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--idle", type=float, default=3.0, help="idle_suspend_after (seconds)")
    ap.add_argument("--state-mib", type=int, default=0, help="random bytes the kernel holds")
    ap.add_argument("--kernel", default="python-microvm")
    ap.add_argument("--cwd", help="the kernel's working directory (its workspace); default: "
                    "an empty one")
    ap.add_argument("--think", type=float, default=3.0, help="seconds between the kernel_info "
                    "and the cell")
    ap.add_argument("--modes", default="incremental,full", help="suspend snapshot kinds to "
                    "measure, one kernel each, in this order (incremental, full)")
    ap.add_argument("--verbose", action="store_true", help="the kernel logs at INFO (its "
                    "suspend and resume timings)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"incremental", "full"}:
        raise SystemExit("--modes takes incremental and/or full")
    results = {mode: measure(args, mode) for mode in modes}

    for mode, rows in results.items():
        med = {k: median(v) for k, v in rows.items()}
        print_table(f"idle suspend, {mode} snapshot (idle_suspend_after={args.idle:g} s, "
                    f"+{args.state_mib} MiB state, {args.rounds} rounds, medians)", [
            ("1+1 round trip: first after suspend | normal", med["first"], med["normal"], "ms"),
            (f"  first, {args.think:g} s after a kernel_info | normal", med["after_info"],
             med["normal"], "ms"),
        ], "after suspend", "normal")
        print_table(f"memory per idle kernel (Pss), {mode} snapshot", [
            ("QEMU processes: suspended | running", med["qemu_susp"], med["qemu_run"], "MiB"),
            ("  of which Pss_Anon (private) while running", 0.0, med["qemu_anon"], "MiB"),
            ("QEMU of round 1 (VM from the warm snapshot)", rows["qemu_susp"][0],
             rows["qemu_run"][0], "MiB"),
            ("kernel process: suspended | running", med["kernel_susp"], med["kernel_run"], "MiB"),
            ("total: suspended | running", med["qemu_susp"] + med["kernel_susp"],
             med["qemu_run"] + med["kernel_run"], "MiB"),
        ], "suspended", "running")
        print(f"\n{mode}: freed per idle kernel: {med['qemu_run'] + med['kernel_run'] - med['qemu_susp'] - med['kernel_susp']:.1f} MiB "
              f"(QEMU processes while running: {med['n_qemu_run']:g}); suspend snapshot on disk: "
              f"{med['disk']:.1f} MiB, taken in {med['snap_s'] * 1000:.0f} ms; suspended "
              f"{med['wait']:.1f} s after the last cell (idle time {args.idle:g} s + the CPU "
              f"check's window)")
    if "incremental" in results and "full" in results:
        inc = {k: median(v) for k, v in results["incremental"].items()}
        full = {k: median(v) for k, v in results["full"].items()}
        print_table("suspend snapshot: incremental | full (medians)", [
            ("size on disk", inc["disk"], full["disk"], "MiB"),
            ("time to take it (the kernel's own timing)", inc["snap_s"], full["snap_s"], "ms"),
            ("first 1+1 after suspend (resume + cell)", inc["first"], full["first"], "ms"),
            ("normal 1+1", inc["normal"], full["normal"], "ms"),
        ], "incremental", "full")


if __name__ == "__main__":
    main()
