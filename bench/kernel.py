"""Benchmark: the "Python (microVM)" kernel beside the plain python3 ipykernel, same run.

Figures (each printed with the ratio microVM / ipykernel):
  launch -> kernel_info reply; launch -> `import numpy, pandas, matplotlib` finished;
  `1+1` execute round trip p50; restart -> ready; restart -> imports finished (both also for a
  restart that kills the old process);
  50 MB printed -> received.

"restart" is KernelManager.restart_kernel() as JupyterLab's restart button calls it (through
jupyter_server): a shutdown_request, then the new process once the old one has exited; "restart
(kill)" is restart_kernel(now=True), which kills the old process instead. Each round restarts
RESTARTS times each way: how soon the frontend's sockets reconnect to the new process varies by
~100 ms from restart to restart (ZMQ's reconnect interval has random jitter), so medians need
more than a few samples.

Each round launches the two kernels one after the other and then runs every other series
interleaved (a `1+1` cell or a restart of one kernel, then of the other): the ratios compare
the kernels under the same machine conditions, which drift here by +-20% over minutes.

"launch" starts at KernelManager.start_kernel(); "ready" is jupyter_client's wait_for_ready(),
which after the first kernel_info reply also waits for 0.2 s of IOPub silence — both kernels pay
that, and it bounds how small the launch -> imports ratio can get.

From its second launch on, the microVM kernel starts from the launch hint its previous launch
left (early start: VM restored and first kernel_info answered while ipykernel imports; see
supermachine_kernel/early_start.py); the medians are over --rounds launches. Run with
SUPERMACHINE_EARLY_START=0 in the environment to measure without it.

Run: .venv/bin/python bench/kernel.py [--rounds N] [--mb 50] [--only output [--prints K]]
     .venv/bin/python bench/kernel.py --only workspace [--rounds N]

The output figure runs the microVM kernel with `iopub_data_rate_limit=0`: plain ipykernel has
no limit of its own to compare with (the default one passes 30 MB per 3 s and drops the rest).

`--only workspace` measures the workspace sync (c.MicroVMKernel.workspace, issue 13) on the
microVM kernel alone, both sides in the same run: `1+1` p50/p95 with the sync on vs off (two
kernels started in the same directory of WS_FILES small files, cells interleaved; target: at
most +2 ms), launch -> a 100 MB host file readable by a cell (vs launch -> `1+1` done with the
sync off) and ready -> readable, and a cell writing 100 MB (done when the file is on the host)
vs the same cell with the sync off.

`--only output` measures only the output figure: per round both kernels are launched, then the
print cell runs K times on each, interleaved; the launch figures are still printed, the others
show n/a.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import median, percentile, print_table  # noqa: E402

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

IMPORTS = "import numpy, pandas, matplotlib"
# Pause after a launch and before each restart, for both kernels: the microVM kernel's pool
# restores its next VM in the background 3 s after start-up (session/vm.py POOL_DEFER_SECONDS),
# and a user's cells come seconds apart anyway.
SETTLE_S = 4.0
RT_CELLS = 40  # `1+1` cells per round and kernel
RESTARTS = 4  # per round and kind (graceful, kill)
# Plain ipykernel has no output rate limit of its own (jupyter_server applies one to every
# kernel); the microVM kernel's default (10 MB/s over 3 s) would drop part of the 50 MB.
NO_DATA_LIMIT = ["--MicroVMKernel.iopub_data_rate_limit=0"]


def run_cell(kc, code: str, timeout: float = 300.0) -> tuple[int, list[dict]]:
    """Executes code; returns (bytes of stream output received, iopub messages) once idle."""
    msg_id = kc.execute(code)
    received = 0
    msgs = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if msg["msg_type"] == "stream":
            received += len(msg["content"]["text"])
        if msg["msg_type"] == "error":
            raise RuntimeError("cell failed: " + msg["content"]["ename"] + ": " + msg["content"]["evalue"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    kc.get_shell_msg(timeout=timeout)
    return received, msgs


FIGURES = ("info", "imports", "rt", "restart", "restart_imports", "restart_kill",
           "restart_kill_imports", "print")


def launch(name: str, out: dict[str, list[float]], extra: list[str],
           specs: KernelSpecManager | None = None) -> tuple[KernelManager, object]:
    """Starts one kernel, recording launch -> kernel_info and launch -> imports done. `specs`
    resolves the kernel name (default: the installed kernelspecs)."""
    km = KernelManager(kernel_name=name) if specs is None else \
        KernelManager(kernel_name=name, kernel_spec_manager=specs)
    t0 = time.perf_counter()
    km.start_kernel(extra_arguments=extra)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=300)
        out["info"].append(time.perf_counter() - t0)
        run_cell(kc, IMPORTS)
        out["imports"].append(time.perf_counter() - t0)
    except BaseException:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    return km, kc


def measure_round(names: list[str], mb: int, out: dict[str, dict[str, list[float]]],
                  extra: dict[str, list[str]], only_output: bool = False, prints: int = 1,
                  specs: KernelSpecManager | None = None,
                  restarts: tuple[bool, ...] = (False, True) * RESTARTS) -> None:
    """One round: the kernels launched one after the other, then every series interleaved (a
    cell or a restart of one kernel, then of the next), so the machine's speed drifting during
    the run (it does, by +-20% over minutes here) affects both kernels alike. `restarts` lists
    the restarts in order (True: kill); `specs` as in launch()."""
    running: dict[str, tuple[KernelManager, object]] = {}
    try:
        for name in names:
            running[name] = launch(name, out[name], extra.get(name, []), specs)
            time.sleep(SETTLE_S)  # its start-up work in the background is over
        for _ in range(0 if only_output else RT_CELLS):
            for name, (_, kc) in running.items():
                t = time.perf_counter()
                run_cell(kc, "1+1")
                out[name]["rt"].append(time.perf_counter() - t)
        chunk = 1 << 20
        code = f"import sys\nfor _ in range({mb}):\n    sys.stdout.write('x' * {chunk - 1} + '\\n')\n"
        for _ in range(prints):
            for name, (_, kc) in running.items():
                t = time.perf_counter()
                got, _ = run_cell(kc, code)
                dt = time.perf_counter() - t
                out[name]["print"].append(got / dt / 1e6 if got else float("nan"))
        for kill in () if only_output else restarts:
            key = "restart_kill" if kill else "restart"
            for name, (km, kc) in running.items():
                time.sleep(SETTLE_S)  # as a user would: the last restart's background work is over
                t = time.perf_counter()
                km.restart_kernel(now=kill)
                kc.wait_for_ready(timeout=300)
                out[name][key].append(time.perf_counter() - t)
                run_cell(kc, IMPORTS)
                out[name][key + "_imports"].append(time.perf_counter() - t)
    finally:
        for km, kc in running.values():
            kc.stop_channels()
            km.shutdown_kernel(now=True)


WS_FILES = 50
WS_MB = 100
WS_CHECK = f"import os; assert os.path.getsize('big.bin') == {WS_MB} << 20"
WS_WRITE = (f"block = bytes(range(256)) * 4096\nwith open('out.bin', 'wb') as f:\n"
            f"    for _ in range({WS_MB}):\n        f.write(block)")


def start_in(name: str, cwd: str, extra: list[str]) -> tuple[KernelManager, object, float]:
    """A kernel started in `cwd` (the notebook's directory); (km, kc, seconds to ready)."""
    km = KernelManager(kernel_name=name)
    t0 = time.perf_counter()
    km.start_kernel(extra_arguments=extra, cwd=cwd)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=300)
    return km, kc, t0


def stop(km: KernelManager, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def host_cell_cost(root: str, n: int = 2000) -> float:
    """Seconds the kernel's before-cell check takes on `root` when nothing changed (the same
    WorkspaceSync the kernel holds, after a first pass)."""
    from supermachine_kernel.workspace import guest_side  # noqa: PLC0415
    from supermachine_kernel.workspace.scan import Limits  # noqa: PLC0415
    from supermachine_kernel.workspace.sync import WorkspaceSync  # noqa: PLC0415

    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as guest:
        ws = WorkspaceSync(root, guest, "sync", Limits(), watch_host=True)
        ws.attach(guest_side.list_tree(guest, [], True, 100), lambda ops: {"failed": []})

        class NoVm:
            def upload(self, src: str, dst: str, mode: int | None = None) -> int:
                return 0

            def spawn(self, argv: list, **kw: object) -> None:
                raise AssertionError("no guest process expected")

        for _ in range(3):
            ws.before_cell(NoVm())
        assert ws.unchanged()
        t = time.perf_counter()
        for _ in range(n):
            ws.unchanged()
        return (time.perf_counter() - t) / n


def measure_workspace(name: str, rounds: int) -> None:
    """The `--only workspace` figures (see the module doc)."""
    import tempfile  # noqa: PLC0415

    on, off = ["--MicroVMKernel.workspace=sync"], ["--MicroVMKernel.workspace=off"]
    rt: dict[str, list[float]] = {"sync": [], "off": []}
    into: dict[str, list[float]] = {"launch": [], "ready": [], "off_launch": []}
    write: dict[str, list[float]] = {"sync": [], "off": []}
    paired: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as root:
        small, big, empty = (os.path.join(root, d) for d in ("small", "big", "empty"))
        for d in (small, big, empty):
            os.mkdir(d)
        for i in range(WS_FILES):
            with open(os.path.join(small, f"file{i:03}.csv"), "w") as f:
                f.write("a,b\n" + f"{i},{i * i}\n" * 100)
        with open(os.path.join(big, "big.bin"), "wb") as f:
            f.write(bytes(range(256)) * (WS_MB << 12))
        for _ in range(rounds):
            # 1+1, sync on vs off, same directory, interleaved (the order alternates).
            kernels = {mode: start_in(name, small, args)[:2]
                       for mode, args in (("sync", on), ("off", off))}
            try:
                time.sleep(SETTLE_S)
                for mode, (_, kc) in kernels.items():
                    run_cell(kc, "1+1")  # the first cell (attach and first push) is not counted
                for i in range(RT_CELLS):
                    took = {}
                    for mode in ("sync", "off") if i % 2 else ("off", "sync"):
                        t = time.perf_counter()
                        run_cell(kernels[mode][1], "1+1")
                        took[mode] = time.perf_counter() - t
                        rt[mode].append(took[mode])
                    paired.append(took["sync"] - took["off"])
                # A cell writing 100 MB: done when it is on the host (sync) vs in the VM (off).
                for mode, (_, kc) in kernels.items():
                    t = time.perf_counter()
                    run_cell(kc, WS_WRITE)
                    write[mode].append(time.perf_counter() - t)
                    run_cell(kc, "import os; os.remove('out.bin')")
            finally:
                for km, kc in kernels.values():
                    stop(km, kc)
            leftover = os.path.join(small, "out.bin")
            if os.path.exists(leftover):
                os.remove(leftover)
            # Launch -> a 100 MB host file readable in the guest.
            km, kc, t0 = start_in(name, big, on)
            try:
                ready = time.perf_counter()
                run_cell(kc, WS_CHECK)
                done = time.perf_counter()
                into["launch"].append(done - t0)
                into["ready"].append(done - ready)
            finally:
                stop(km, kc)
            km, kc, t0 = start_in(name, empty, off)
            try:
                run_cell(kc, "1+1")
                into["off_launch"].append(time.perf_counter() - t0)
            finally:
                stop(km, kc)
    rows = [
        ("`1+1` round trip p50", percentile(rt["sync"], 50), percentile(rt["off"], 50), "ms"),
        ("`1+1` round trip p95", percentile(rt["sync"], 95), percentile(rt["off"], 95), "ms"),
        (f"launch -> {WS_MB} MB host file read (vs 1+1)", median(into["launch"]),
         median(into["off_launch"]), "ms"),
        (f"cell writing {WS_MB} MB, done", median(write["sync"]), median(write["off"]), "ms"),
    ]
    print_table(f"workspace sync on vs off ({WS_FILES} files; {rounds} rounds)", rows,
                "sync", "off")
    print(f"`1+1` sync - off, paired cells (order alternating): median "
          f"{median(paired) * 1000:+.2f} ms over {len(paired)} pairs")
    print(f"per cell with nothing changed, on the host: {host_cell_cost(small) * 1e6:.1f} us "
          f"(WorkspaceSync.unchanged, this process)")
    print(f"`1+1` p50 difference: {(percentile(rt['sync'], 50) - percentile(rt['off'], 50)) * 1000:+.2f} ms "
          f"(target <= +2 ms); ready -> {WS_MB} MB readable: "
          + ", ".join(f"{x:.2f} s" for x in into["ready"]) + " (target <= 2 s under TCG)")


def summarize(out: dict[str, list[float]]) -> dict[str, float]:
    res = {k: median(v) for k, v in out.items() if k != "rt"}
    res["rt_p50"] = percentile(out["rt"], 50)
    res["rt_p95"] = percentile(out["rt"], 95)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=int, default=50, help="megabytes printed in the output figure")
    ap.add_argument("--kernel", default="python-microvm")
    ap.add_argument("--baseline", default="python3")
    ap.add_argument("--only", choices=["output", "workspace"], help="measure only this figure")
    ap.add_argument("--prints", type=int, default=None,
                    help="print cells per round and kernel (default: 1, or 3 with --only output)")
    args = ap.parse_args()
    if args.only == "workspace":
        measure_workspace(args.kernel, args.rounds)
        return
    prints = args.prints or (3 if args.only == "output" else 1)
    names = [args.baseline, args.kernel]
    out = {name: {k: [] for k in FIGURES} for name in names}
    for _ in range(args.rounds):
        measure_round(names, args.mb, out, {args.kernel: NO_DATA_LIMIT},
                      only_output=args.only == "output", prints=prints)
    base, ours = summarize(out[args.baseline]), summarize(out[args.kernel])
    rows = [
        ("launch -> kernel_info reply", ours["info"], base["info"], "ms"),
        (f"launch -> `{IMPORTS}` done", ours["imports"], base["imports"], "ms"),
        ("`1+1` round trip p50", ours["rt_p50"], base["rt_p50"], "ms"),
        ("`1+1` round trip p95", ours["rt_p95"], base["rt_p95"], "ms"),
        ("restart -> ready", ours["restart"], base["restart"], "ms"),
        ("restart -> imports done", ours["restart_imports"], base["restart_imports"], "ms"),
        ("restart (kill) -> ready", ours["restart_kill"], base["restart_kill"], "ms"),
        ("restart (kill) -> imports done", ours["restart_kill_imports"],
         base["restart_kill_imports"], "ms"),
        (f"{args.mb} MB printed -> received", ours["print"], base["print"], "MB/s"),
    ]
    print_table("kernel: Python (microVM) vs plain ipykernel", rows, args.kernel, args.baseline)
    pairs = zip(out[args.kernel]["print"], out[args.baseline]["print"])
    print("output, cell by cell (MB/s, microVM/ipykernel): "
          + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in pairs))
    print("goals: launch->imports <= 0.5x, restart->imports <= 0.5x, launch->kernel_info <= 1.2x, "
          "restart->ready <= 1.2x, 1+1 <= 2x")


if __name__ == "__main__":
    main()
