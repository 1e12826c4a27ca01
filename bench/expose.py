"""Benchmark: exposed ports (supermachine_kernel/expose.py) against a real microVM, one run.

Figures, for ``python3 -m http.server`` in the guest, same VM, modes interleaved:
  the native agent TCP channel (expose.NATIVE) vs the guest relay process with its spare
  (the path for agents that predate the channel): a small GET after an idle moment, small
  GETs back to back, a --mb MB GET (MB/s);
  the same small GET and big GET from inside the guest (the floor: no relay).

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


def wait_serving(port: int) -> None:
    for _ in range(600):
        try:
            get(port, "/hi.txt")
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.5)
    raise RuntimeError("the guest HTTP server never answered")


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
        modes = ["native", "relay"] if vm.tcp_channels else ["relay"]
        idle: dict[str, list[float]] = {m: [] for m in ("native", "relay")}
        burst: dict[str, list[float]] = {m: [] for m in ("native", "relay")}
        big: dict[str, list[float]] = {m: [] for m in ("native", "relay")}
        for mode in modes * 2:  # interleaved, so drift in the machine's load hits both
            expose.NATIVE = mode == "native"
            expose.SPARE = True
            with vm.expose_tcp(PORT) as x:
                wait_serving(x.host_port)
                burst[mode] += [timed(lambda: get(x.host_port, "/hi.txt")) for _ in range(a.n)]
                for _ in range(a.n):
                    time.sleep(1.5)
                    idle[mode].append(timed(lambda: get(x.host_port, "/hi.txt")))
                big[mode] += [timed(lambda: get(x.host_port, "/big.bin")) for _ in range(2)]
        expose.NATIVE = True
        floor = inside(vm, "/hi.txt", a.n)
        big_inside = inside(vm, "/big.bin", 3)
        print(f"accelerator: {vm.accel}; native TCP channel: {vm.tcp_channels}")
    print_table("exposed port: native agent channel vs guest relay process (with its spare)", [
        ("small GET after an idle moment", median(idle["native"]), median(idle["relay"]), "ms"),
        ("small GET back to back", median(burst["native"]), median(burst["relay"]), "ms"),
        (f"{a.mb} MB GET", a.mb / median(big["native"]), a.mb / median(big["relay"]), "MB/s"),
    ], "native", "relay", higher_is_better={"MB/s"})
    print_table("native exposed port vs inside the guest", [
        ("small GET after idle", median(idle["native"]), floor, "ms"),
        (f"{a.mb} MB GET", a.mb / median(big["native"]), a.mb / big_inside, "MB/s"),
    ], "exposed", "in guest", higher_is_better={"MB/s"})


if __name__ == "__main__":
    main()
