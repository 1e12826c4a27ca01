"""Benchmark: how long a stuck guest takes to end, and the kernel to answer again (issue 16 item 1).

One kernel (vm backend, this run's grace / frame deadline / ping settings) runs each stuck state
in turn; for each it reports the seconds from the moment the state is reached (the interrupt
sent; for the half-sent frame and the frozen agent, the cell sent) to the cell's error reply,
and from that reply to the next `1+1`'s answer. The baseline, measured in the same run: a plain
interrupt of `while True: pass`, which the guest answers with KeyboardInterrupt.

Run: .venv/bin/python bench/stuck.py [--grace 5] [--frame-timeout 10] [--ping-interval 2]
                                    [--ping-timeout 10] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402

from jupyter_client.manager import KernelManager  # noqa: E402

from supermachine_kernel.cli.install import install  # noqa: E402

# (name, code, interrupt after the cell printed "started")
CASES = [
    ("plain interrupt (baseline)", "print('started', flush=True)\nwhile True: pass", True),
    ("signal-deaf C loop", "print('started', flush=True)\nsum(range(10**13))", True),
    ("fork bomb", "import os\nprint('started', flush=True)\nwhile True:\n    try:\n"
     "        os.fork()\n    except OSError:\n        pass\n", True),
    ("half-sent 31 MB frame", "import gc, os, struct, time\nch = next(o for o in "
     "gc.get_objects() if type(o).__name__ == 'Channel' and hasattr(o, '_wfd'))\n"
     "os.write(ch._wfd, struct.pack('>I', 31 * 1024 * 1024) + b'{')\ntime.sleep(3600)\n", False),
    ("agent frozen by ptrace", "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\n"
     "assert libc.ptrace(0x4206, 1, None, None) == 0\n"
     "assert libc.ptrace(0x4207, 1, None, None) == 0\ntime.sleep(3600)\n", False),
]


def run_cell(km: KernelManager, kc, code: str, interrupt: bool, timeout: float = 900
             ) -> tuple[float, dict]:
    """Seconds from the stuck moment to the execute_reply, and the reply's content."""
    msg_id = kc.execute(code, stop_on_error=False)  # the next cell is not aborted
    t0 = time.monotonic()
    if interrupt:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = kc.iopub_channel.get_msg(timeout=timeout)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                    and "started" in msg["content"].get("text", "")):
                break
        time.sleep(0.5)
        km.interrupt_kernel()
        t0 = time.monotonic()
    while True:
        msg = kc.shell_channel.get_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") == msg_id:
            return time.monotonic() - t0, msg["content"]


def answer_again(kc, timeout: float = 900) -> float:
    t0 = time.monotonic()
    reply = kc.execute_interactive("1+1", timeout=timeout, output_hook=lambda m: None)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grace", type=float, default=5.0)
    ap.add_argument("--frame-timeout", type=float, default=10.0)
    ap.add_argument("--ping-interval", type=float, default=2.0)
    ap.add_argument("--ping-timeout", type=float, default=10.0)
    ap.add_argument("--only", nargs="*", default=None, help="case names (substrings)")
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="smk-bench-stuck-")
    name = "smk-bench-stuck"
    install(prefix=root, kernel_name=name, backend="vm", interrupt_mode="message",
            display_name="Python (microVM, stuck bench)", extra_args=[
                "--MicroVMKernel.pool_min=0", f"--MicroVMKernel.interrupt_grace={args.grace}",
                f"--MicroVMKernel.frame_timeout={args.frame_timeout}",
                f"--MicroVMKernel.agent_ping_interval={args.ping_interval}",
                f"--MicroVMKernel.agent_ping_timeout={args.ping_timeout}",
                "--MicroVMKernel.guest_user=root"])  # the ptrace case needs root in the guest
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (os.path.join(root, "share", "jupyter"), os.environ.get("JUPYTER_PATH")) if p)
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=600)
    rows = []
    baseline_end = baseline_again = float("nan")
    try:
        for case, code, interrupt in CASES:
            if args.only and not any(o in case for o in args.only) and "baseline" not in case:
                continue
            while True:  # drop what earlier cells left
                try:
                    kc.iopub_channel.get_msg(timeout=0.2)
                except queue.Empty:
                    break
            took, reply = run_cell(km, kc, code, interrupt)
            again = answer_again(kc)
            print(f"{case}: {took:.2f} s to {reply.get('ename', reply['status'])}: "
                  f"{reply.get('evalue', '')[:160]}; next 1+1 after {again:.2f} s", flush=True)
            if "baseline" in case:
                baseline_end, baseline_again = took, again
            else:
                rows.append((f"{case}: stuck -> error reply", took, baseline_end, "s"))
                rows.append((f"{case}: error reply -> 1+1 answered", again, baseline_again, "s"))
    finally:
        kc.stop_channels()
        threading.Thread(target=km.shutdown_kernel, daemon=True).start()
        time.sleep(2)
    print_table(f"stuck guest (grace {args.grace:g} s, frame deadline {args.frame_timeout:g} s, "
                f"ping every {args.ping_interval:g} s, timeout {args.ping_timeout:g} s)", rows,
                "this case", "plain interrupt")


if __name__ == "__main__":
    main()
