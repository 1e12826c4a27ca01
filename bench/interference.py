"""Benchmark: how much a busy user's kernels slow another user's `1+1`, with and without the
CPU share limit (supermachine_kernel/limits, cgroups), same run.

Two "users", each a cgroup made the way the kernel makes it (limits/cgroup.py: `plan` and
`apply`, one group per user under one parent, so their weights compete): user A runs one kernel
that times `1+1` execute round trips; user B runs BUSY kernels whose guests each run a CPU
loop and a memory hog (a process rewriting 256 MiB of guest RAM forever). Both users are root
here (the processes cannot change user), so each kernel's process tree (kernel + QEMU) is put in
its user's group by this script, under made-up uids; on a Hub each kernel joins its own user's
group itself.

Phases (each round: idle, then the three busy ones alternating sample by sample, so that the
machine's drift hits them alike):
  idle         B's kernels idle (the baseline)
  no cgroups   B busy, every process in the root cgroup
  equal share  B busy, A and B at the same CPU weight (100 = no cpu_weight limit)
  B weight N   B busy, B's cpu_weight = N (--weight), A's 100

A second table times a CPU-bound cell of A's (what the CPU share is about: with B busy, A's
share of a contended CPU is 100 / (100 + B's weight)).

The frontend (this script, which times the cells) is in A's group in the cgroup phases, as
user A's single-user server is on a Hub.

Run: .venv/bin/python bench/interference.py [--rounds 3] [--samples 15] [--cpu-samples 3]
                                            [--busy 2] [--weight 10]
Needs root and a cgroup path (v2 cpu+memory, or v1 cpu and memory); prints which it used.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
from common import median, percentile, print_table  # noqa: E402

from jupyter_client.manager import KernelManager  # noqa: E402
import psutil  # noqa: E402

from supermachine_kernel.cli.install import install  # noqa: E402
from supermachine_kernel.limits.cgroup import HostFacts, apply, plan  # noqa: E402
from supermachine_kernel.limits.config import MicroVMLimits  # noqa: E402

BUSY_CELL = r'''
import subprocess
subprocess.Popen(["python3", "-c", "while True: pass"])
subprocess.Popen(["python3", "-c", "b = bytearray(256 << 20)\nwhile True:\n    for i in range(0, len(b), 4096): b[i] = (b[i] + 1) & 255"])
'''
CPU_CELL = "sum(range(3_000_000))"  # CPU-bound: ~0.5 s of guest Python under TCG
STOP_CELL = 'import subprocess; subprocess.run(["pkill", "-f", "while True"])'


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [pid]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` (from /proc; their threads included)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def move(pids: list[int], groups: list[str]) -> None:
    for group in groups:
        for pid in pids:
            try:
                with open(os.path.join(group, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except ProcessLookupError:
                pass


class Kernel:
    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.km = KernelManager(kernel_name="smk-bench-interference")
        self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=600)

    def run(self, code: str, timeout: float = 300) -> float:
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code)
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        took = time.perf_counter() - t0
        assert reply["content"]["status"] == "ok", reply["content"]
        return took

    def pids(self) -> list[int]:
        return tree(self.km.provisioner.process.pid)

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=15, help="1+1 cells per phase per round")
    ap.add_argument("--cpu-samples", type=int, default=3,
                    help="CPU-bound cells per phase per round")
    ap.add_argument("--busy", type=int, default=2, help="busy kernels of user B")
    ap.add_argument("--weight", type=int, default=10, help="user B's cpu_weight")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/interference.py needs root (it creates and fills cgroups)")

    name = f"smk-bench-{uuid.uuid4().hex[:6]}"
    facts = HostFacts.read()
    limits = {w: MicroVMLimits(cpu_weight=w, memory_per_user="4G", cgroup_name=name)
              for w in (100, args.weight)}
    plans = {"A": plan(limits[100], facts, 9001, 0), "B": plan(limits[100], facts, 9002, 0),
             "B-weighted": plan(limits[args.weight], facts, 9002, 0)}
    if plans["A"].mode == "none":
        sys.exit(f"no cgroup path on this host: {plans['A'].not_enforced}")
    root_groups = sorted({os.path.dirname(os.path.dirname(g)) for g in plans["A"].join})
    user_groups = {u: sorted(set(p.join) - {g for g in p.join if "kernel-" in g})
                   for u, p in plans.items()}
    print(f"cgroup mode: {plans['A'].mode}; groups under {name}; root groups {root_groups}")

    prefix = tempfile.mkdtemp(prefix="smk-bench-interference-")
    install(prefix=prefix, kernel_name="smk-bench-interference", backend="vm",
            interrupt_mode="message", display_name="bench interference",
            extra_args=["--MicroVMKernel.pool_min=0"])
    env = dict(os.environ, JUPYTER_PATH=os.path.join(prefix, "share", "jupyter"),
               SUPERMACHINE_RESTORE_AHEAD="0", SUPERMACHINE_LIMITS_FILE="/nonexistent")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]
    workdir = tempfile.mkdtemp(prefix="smk-bench-interference-cwd-")  # nothing to sync
    kernels: list[Kernel] = []
    samples: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    cpu_split: dict[str, list[float]] = {}  # phase -> [A's CPU s, B's CPU s] during A's cells
    try:
        a = Kernel(env, workdir)
        kernels.append(a)
        busy = []
        for _ in range(args.busy):
            busy.append(Kernel(env, workdir))
            kernels.append(busy[-1])
        for k in kernels:
            k.run("1+1")  # every REPL warm
        a_pids: list[int] = []
        b_pids: list[int] = []

        def refresh() -> None:
            """The kernels' process trees (a guest that died has a new QEMU)."""
            a_pids[:] = a.pids()
            b_pids[:] = [p for k in busy for p in k.pids()]

        me = [os.getpid()]  # the frontend: on a Hub, user A's server, in A's group

        def place(phase: str) -> None:
            refresh()
            if phase == "no cgroups":
                move(a_pids + me, root_groups)
                move(b_pids, root_groups)
                return
            out_a = apply(plans["A"], a_pids[0])
            out_b = apply(plans["B-weighted" if phase.startswith("B weight") else "B"], b_pids[0])
            assert "cpu_weight" in out_a.enforced and "cpu_weight" in out_b.enforced, (out_a, out_b)
            move(a_pids + me, user_groups["A"])
            move(b_pids, user_groups["B"])

        phases = ["idle", "no cgroups", "equal share", f"B weight {args.weight}"]
        for r in range(args.rounds):
            place("equal share")
            for k in busy:
                k.run(STOP_CELL)
            time.sleep(1.0)
            got = samples.setdefault("idle", [])
            for _ in range(args.samples):
                got.append(a.run("1+1"))
            for _ in range(args.cpu_samples):
                cpu.setdefault("idle", []).append(a.run(CPU_CELL))
            for k in busy:
                k.run(BUSY_CELL)
            time.sleep(1.0)
            # The busy phases alternate sample by sample: the machine's drift hits each alike.
            for _ in range(args.samples):
                for phase in phases[1:]:
                    place(phase)
                    time.sleep(0.2)
                    samples.setdefault(phase, []).append(a.run("1+1"))
            for _ in range(args.cpu_samples):
                for phase in phases[1:]:
                    place(phase)
                    time.sleep(0.2)
                    a0, b0 = cpu_seconds(a_pids), cpu_seconds(b_pids)
                    cpu.setdefault(phase, []).append(a.run(CPU_CELL))
                    a1, b1 = cpu_seconds(a_pids), cpu_seconds(b_pids)
                    split = cpu_split.setdefault(phase, [0.0, 0.0])
                    split[0] += a1 - a0
                    split[1] += b1 - b0
            for k in busy:
                k.run(STOP_CELL)
            print(f"round {r + 1}: " + ", ".join(
                f"{p} p50 {median(v) * 1000:.1f} ms" for p, v in samples.items()), flush=True)
    finally:
        move([os.getpid()], root_groups)
        for k in kernels:
            try:
                k.stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping a kernel: {e}", file=sys.stderr)
        # The kernels' QEMUs may take a moment to go: a group is removed once it is empty.
        groups = sorted({g for p in plans.values() for g in p.groups}, key=len, reverse=True)
        deadline = time.monotonic() + 30
        while groups and time.monotonic() < deadline:
            for group in list(groups):
                try:
                    os.rmdir(group)
                    groups.remove(group)
                except FileNotFoundError:
                    groups.remove(group)
                except OSError:
                    pass
            time.sleep(0.5)
        if groups:
            print(f"left behind (still in use): {groups}", file=sys.stderr)

    base = samples["idle"]
    rows = []
    for phase in phases[1:]:
        rows.append((f"1+1 p50, B busy, {phase}", median(samples[phase]), median(base), "ms"))
        rows.append((f"1+1 p90, B busy, {phase}", percentile(samples[phase], 90),
                     percentile(base, 90), "ms"))
    print_table(f"user A's 1+1 with user B's {args.busy} busy kernels ({plans['A'].mode} "
                f"cgroups, {len(base)} samples per phase)", rows, "B busy", "B idle")
    rows = [(f"{CPU_CELL} p50, B busy, {phase}", median(cpu[phase]), median(cpu["idle"]), "ms")
            for phase in phases[1:]]
    print_table(f"user A's CPU-bound cell ({len(cpu['idle'])} samples per phase); the share "
                f"allows {1 / (100 / (100 + args.weight)):.2f}x at B weight {args.weight}, "
                f"2x at an equal share", rows, "B busy", "B idle")
    print("\nCPU time while A's CPU-bound cells ran (A's kernel+QEMU vs B's):")
    for phase in phases[1:]:
        a_s, b_s = cpu_split[phase]
        weight = {"equal share": 0.5, "no cgroups": float("nan")}.get(
            phase, 100 / (100 + args.weight))
        print(f"  {phase:<14} A {a_s:6.1f} s, B {b_s:6.1f} s: A's part {a_s / (a_s + b_s):.0%}"
              + ("" if weight != weight else f" (its share of a contended CPU: {weight:.0%})"))


if __name__ == "__main__":
    main()
