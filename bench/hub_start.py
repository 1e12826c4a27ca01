"""Benchmark: a new user's first-ever kernel start vs their second, restoring from the host-wide
store (issue 14 part 4), beside root's starts from its own cache, same run.

A local user is created for the run (removed after). As that user, with an empty home, a
jupyter_client KernelManager starts "Python (microVM)" and times launch -> first `1+1` reply;
then a second kernel the same way (the first one left its launch hint in the user's cache).
The same two figures are taken for root with its own cache (where `make setup` built the image
and warm snapshot: the single-user case) as the baseline. The
store is $SUPERMACHINE_SHARED_CACHE_DIR (else /var/cache/supermachine-kernel): prepare it first
with `supermachine-kernel image build --shared && supermachine-kernel prepare --shared`.

Run (as root): .venv/bin/python bench/hub_start.py [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, print_table  # noqa: E402

# Run as the measured user: two kernel starts, each timed from start_kernel() to the first
# `1+1` reply; prints the two durations as JSON.
_AS_USER = r"""
import json, sys, time
from jupyter_client.manager import KernelManager

out = []
for _ in range(2):
    t0 = time.perf_counter()
    km = KernelManager(kernel_name="python-microvm")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=600)
        reply = kc.execute_interactive("1+1", timeout=600, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        out.append(time.perf_counter() - t0)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
print(json.dumps(out))
"""


def run_as(user: str | None, store: str, python: str) -> list[float]:
    env = {"PATH": f"{os.path.dirname(python)}:/usr/bin:/bin",
           "SUPERMACHINE_SHARED_CACHE_DIR": store, "LANG": "C.UTF-8"}
    argv = [python, "-c", _AS_USER]
    if user is not None:
        home = pwd.getpwnam(user).pw_dir
        env.update(HOME=home, USER=user)
        argv = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", user, "--"] + argv
    else:  # the baseline: root with its own cache (its image and warm snapshot from make setup)
        home = tempfile.mkdtemp(prefix="smk-bench-")  # an empty notebook directory
        env.update(HOME=os.environ.get("HOME", "/root"))
    # Started in the (empty) home: the kernel's workspace is its working directory.
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, cwd=home)
    if user is None:
        os.rmdir(home)
    if r.returncode != 0:
        raise RuntimeError(f"kernel starts as {user or 'root'} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="new users (default %(default)s)")
    hub_venv = os.path.join(sys.prefix, "hub-venv", "bin", "python")
    ap.add_argument("--python", default=hub_venv if os.path.exists(hub_venv) else sys.executable,
                    help="a Python with the kernelspec that every user can run (default: "
                    ".venv/hub-venv's, made by tests/hub, else this one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (creates local users)", file=sys.stderr)
        return 2
    store = os.environ.get("SUPERMACHINE_SHARED_CACHE_DIR") or "/var/cache/supermachine-kernel"
    if not os.path.isdir(store):
        print(f"no host-wide store at {store}: run `supermachine-kernel prepare --shared`",
              file=sys.stderr)
        return 2
    first, second, admin_first, admin_second = [], [], [], []
    for _ in range(args.rounds):
        name = f"smkbench{secrets.token_hex(3)}"
        subprocess.run(["useradd", "--create-home", name], check=True)
        try:
            a, b = run_as(name, store, args.python)
        finally:
            subprocess.run(["userdel", "--remove", name], capture_output=True)
        first.append(a)
        second.append(b)
        a, b = run_as(None, store, args.python)
        admin_first.append(a)
        admin_second.append(b)
        print(f"new user: first {first[-1]:.2f} s, second {second[-1]:.2f} s; "
              f"root: {admin_first[-1]:.2f} s, {admin_second[-1]:.2f} s", flush=True)
    print_table(f"launch -> first `1+1` reply, medians of {args.rounds} (store {store})", [
        ("first-ever start of a new user", median(first), median(admin_first), "s"),
        ("second start of that user", median(second), median(admin_second), "s"),
    ], "new user", "root, own cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
