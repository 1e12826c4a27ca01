"""Benchmark: exposed ports (supermachine_kernel/expose.py) against a real microVM, one run.

Figures, for ``python3 -m http.server`` in the guest:
  a small GET after an idle moment, with the spare relay and without (expose.SPARE);
  small GETs back to back (each pays a guest relay start);
  the same small GET from inside the guest (the floor: no relay);
  a --mb MB GET through the exposed port vs from inside the guest (MB/s).

Run: .venv/bin/python bench/expose.py [--mb 10] [--n 6]
"""
from __future__ import annotations

import argparse
import http.client
import time

from common import median, print_table

from supermachine_kernel import api, expose

ROOT = "/tmp/bench-expose"
PORT = 8000

INSIDE = """
import sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    t = time.perf_counter(); body = urllib.request.urlopen(url).read(); times.append(time.perf_counter() - t)
times.sort()
print(times[len(times) // 2])
"""


def get(port: int, path: str) -> bytes:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {r.status}")
        return body
    finally:
        c.close()


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def inside(vm: api.Vm, path: str, n: int) -> float:
    r = vm.exec(["python3", "-c", INSIDE, f"http://127.0.0.1:{PORT}{path}", str(n)])
    return float(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--n", type=int, default=6)
    a = ap.parse_args()
    image = api.Image.build(progress=False)
    with image.boot() as vm:
        vm.exec(["sh", "-c", f"mkdir -p {ROOT} && echo hi > {ROOT}/hi.txt && "
                             f"head -c {a.mb * 1024 * 1024} /dev/urandom > {ROOT}/big.bin"])
        vm.spawn(["python3", "-m", "http.server", str(PORT), "--bind", "127.0.0.1", "--directory", ROOT])
        idle: dict[bool, list[float]] = {True: [], False: []}
        burst: dict[bool, list[float]] = {True: [], False: []}
        for spare in (False, True, False, True):
            expose.SPARE = spare
            with vm.expose_tcp(PORT) as x:
                for _ in range(600):
                    try:
                        get(x.host_port, "/hi.txt")
                        break
                    except (OSError, RuntimeError, http.client.HTTPException):
                        time.sleep(0.5)
                burst[spare] += [timed(lambda: get(x.host_port, "/hi.txt")) for _ in range(a.n)]
                for _ in range(a.n):
                    time.sleep(1.5)
                    idle[spare].append(timed(lambda: get(x.host_port, "/hi.txt")))
        expose.SPARE = True
        floor = inside(vm, "/hi.txt", a.n)
        with vm.expose_tcp(PORT) as x:
            big = median([timed(lambda: get(x.host_port, "/big.bin")) for _ in range(3)])
        big_inside = inside(vm, "/big.bin", 3)
        print(f"accelerator: {vm.accel}")
    print_table("small GET (ms), spare relay vs none", [
        ("after an idle moment", median(idle[True]), median(idle[False]), "ms"),
        ("back to back", median(burst[True]), median(burst[False]), "ms"),
    ], "spare", "no spare")
    print_table("through the exposed port vs inside the guest", [
        ("small GET after idle", median(idle[True]), floor, "ms"),
        (f"{a.mb} MB GET", a.mb / big, a.mb / big_inside, "MB/s"),
    ], "exposed", "in guest", higher_is_better={"MB/s"})


if __name__ == "__main__":
    main()
