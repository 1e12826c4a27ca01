"""Benchmark: what the unprivileged guest user costs (repl_client/guest_user.py), same run, one VM.

A cold-booted VM of the default image: the time of `provision` (once per warm-snapshot bake, one
guest process as root), then host -> guest `Vm.write_file` of 1 KiB files (what the workspace
sync's uploads do) as the guest user (the agent looks up its default user and opens with that
user's file-system ids) and as root (the default-user file moved away), in alternating rounds of
--files files; prints the median per file of each and their ratio.

    .venv/bin/python bench/guest_user.py [--rounds 6] [--files 100]
"""
from __future__ import annotations

import argparse
import statistics
import time

from supermachine_kernel import api
from supermachine_kernel.repl_client.guest_user import DEFAULT_USER_FILE, provision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--files", type=int, default=100)
    args = ap.parse_args()
    image = api.Image.build(snapshot=False, progress=False, cached_only=True)
    off = DEFAULT_USER_FILE + ".off"
    with image.cold_boot() as vm:
        t = time.monotonic()
        provision(vm, "jovyan")
        took = time.monotonic() - t
        vm.exec(["install", "-d", "-m", "1777", "/tmp/w"], user="0")
        per_file: dict[str, list[float]] = {"user": [], "root": []}
        for rnd in range(args.rounds):
            for who in (("user", "root") if rnd % 2 else ("root", "user")):
                if who == "root":
                    vm.exec(["mv", DEFAULT_USER_FILE, off], user="0")
                t = time.monotonic()
                for i in range(args.files):
                    vm.write_file(f"/tmp/w/{who}-{rnd}-{i}", b"x" * 1024)
                per_file[who].append((time.monotonic() - t) / args.files * 1000)
                if who == "root":
                    vm.exec(["mv", off, DEFAULT_USER_FILE], user="0")
    print(f"provision (one guest process, cold-booted VM): {took:.2f} s")
    for who, values in per_file.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"write_file 1 KiB as {who}: median {statistics.median(values):.2f} ms per file "
              f"(rounds: {rounds})")
    ratio = statistics.median(per_file["user"]) / statistics.median(per_file["root"])
    print(f"user / root: {ratio:.2f}")


if __name__ == "__main__":
    main()
