"""Benchmark: the kernel's network egress (core/runtime/src/net/, `_core.NetProxy`).

Host only, same run: an HTTP download of --mb MiB from a local server, direct vs through the
proxy with a policy that allows it (MB/s, median of --n); the time to open a CONNECT tunnel
(policy check, resolution, connect) vs a direct TCP connect: the proxy's own costs.

--guest (a VM of the default image, as a kernel's guest uses it), same run: an HTTP download of
--guest-mb MiB by the guest's Python (urllib, timed inside the guest) through the guest's
proxy port (127.0.0.1:3128 -> agent channel -> NetProxy -> the local server), through a plain
forward to the server (agent channel only), and the same client code on the host, direct.

Run: .venv/bin/python bench/net.py [--mb 256] [--n 5] [--guest [--guest-mb 32]]
"""
from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable

from common import median, print_table

from supermachine_kernel import _core

CHUNK = b"x" * (1 << 20)


def origin(size: int) -> int:
    """A local HTTP server that answers every request with `size` bytes; returns its port."""
    ls = socket.create_server(("127.0.0.1", 0))

    def one(c: socket.socket) -> None:
        with c:
            head = b""
            while b"\r\n\r\n" not in head:
                if not (data := c.recv(4096)):
                    return
                head += data
            if head.startswith(b"PING"):
                c.sendall(b"PONG")
                return
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size >> 20):
                c.sendall(CHUNK)

    def serve() -> None:
        while True:
            c, _ = ls.accept()
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(ls.getsockname()[1])


def download(addr: tuple[str, int], request: bytes) -> float:
    """Seconds to read the whole answer."""
    t = time.perf_counter()
    with socket.create_connection(addr) as s:
        s.sendall(request)
        while s.recv(1 << 20):
            pass
    return time.perf_counter() - t


def tunnel(addr: tuple[str, int], first: bytes, expect: bytes) -> float:
    t = time.perf_counter()
    with socket.create_connection(addr) as s:
        s.sendall(first)
        got = b""
        while not got.endswith(expect):
            if not (data := s.recv(4096)):
                raise RuntimeError(f"closed early: {got!r}")
            got += data
    return time.perf_counter() - t


# The guest's client (and the host-native baseline): read the whole answer, print its seconds.
CLIENT = """
import sys, time, urllib.request
t = time.perf_counter()
with urllib.request.urlopen(sys.argv[1], timeout=600) as r:
    n = 0
    while chunk := r.read(1 << 20):
        n += len(chunk)
print(n, time.perf_counter() - t)
"""
GUEST_PROXY_PORT = 3128  # as kernel/network.py
GUEST_FORWARD_PORT = 3129


def client_seconds(run: Callable[[list[str], dict[str, str]], str], url: str,
                   env: dict[str, str], size: int) -> float:
    """Runs CLIENT with `run(argv, env)` -> stdout; checks the size, returns its seconds."""
    out = run(["python3", "-c", CLIENT, url], env)
    n, seconds = out.split()
    if int(n) != size:
        raise RuntimeError(f"{url}: got {n} bytes, expected {size}")
    return float(seconds)


def guest(args: argparse.Namespace) -> None:
    """Download throughput from a VM: through the policy proxy, through a plain forward, and
    host-native, in the same run."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from supermachine_kernel.api import Image  # noqa: PLC0415

    size = args.guest_mb << 20
    port = origin(size)
    proxy = _core.NetProxy([f"127.0.0.2/32:{port}"], test_route={"127.0.0.2": "127.0.0.1"})
    url = f"http://127.0.0.2:{port}/"
    with Image.build().boot() as vm:
        vm.forward_to_host(GUEST_PROXY_PORT, proxy.port)
        vm.forward_to_host(GUEST_FORWARD_PORT, port)

        def in_guest(argv: list[str], env: dict[str, str]) -> str:
            r = vm.exec(argv, env=env, timeout_ms=600_000)
            if r.exit_code != 0:
                raise RuntimeError(f"guest client failed: {r.stderr!r}")
            return r.stdout.decode()

        def on_host(argv: list[str], env: dict[str, str]) -> str:
            return subprocess.run([sys.executable, *argv[1:]], env=env, check=True,
                                  capture_output=True, text=True).stdout

        via_proxy = {"HTTP_PROXY": f"http://127.0.0.1:{GUEST_PROXY_PORT}"}
        gp, gf, h = [], [], []
        for _ in range(args.n):
            gp.append(client_seconds(in_guest, url, via_proxy, size))
            gf.append(client_seconds(in_guest, f"http://127.0.0.1:{GUEST_FORWARD_PORT}/", {},
                                     size))
            h.append(client_seconds(on_host, f"http://127.0.0.1:{port}/", {}, size))
    proxy.close()
    mb = size / 1e6
    name = f"download {args.guest_mb} MiB"
    print_table(
        f"guest egress (urllib in a {getattr(vm, 'accel', '?')} guest, median of {args.n})",
        [(name + " (guest via proxy)", mb / median(gp), mb / median(h), "MB/s"),
         (name + " (guest via forward)", mb / median(gf), mb / median(h), "MB/s")],
        ours="guest", baseline="host-native", higher_is_better={name + " (guest via proxy)",
                                                               name + " (guest via forward)"},
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--guest", action="store_true", help="also measure from a VM")
    ap.add_argument("--guest-mb", type=int, default=32)
    args = ap.parse_args()
    if args.guest:
        guest(args)
    port = origin(args.mb << 20)
    proxy = _core.NetProxy(["data.test"], resolve={"data.test": ["198.51.100.1"]},
                           test_route={"198.51.100.1": "127.0.0.1"})
    direct_req = b"GET / HTTP/1.1\r\nHost: data.test\r\nConnection: close\r\n\r\n"
    proxied_req = f"GET http://data.test:{port}/ HTTP/1.1\r\nHost: data.test\r\n\r\n".encode()
    d, p = [], []
    for _ in range(args.n):
        d.append(download(("127.0.0.1", port), direct_req))
        p.append(download(("127.0.0.1", proxy.port), proxied_req))
    connect = f"CONNECT data.test:{port} HTTP/1.1\r\n\r\nPING\r\n\r\n".encode()
    td, tp = [], []
    for _ in range(max(args.n * 10, 20)):
        td.append(tunnel(("127.0.0.1", port), b"PING\r\n\r\n", b"PONG"))
        tp.append(tunnel(("127.0.0.1", proxy.port), connect, b"PONG"))
    proxy.close()
    mb = args.mb * (1 << 20) / 1e6
    print_table(
        "host egress proxy (allowed name, local server)",
        [(f"download {args.mb} MiB", mb / median(p), mb / median(d), "MB/s"),
         ("CONNECT + first answer", median(tp), median(td), "ms")],
        ours="through NetProxy", baseline="direct", higher_is_better={f"download {args.mb} MiB"},
    )

if __name__ == "__main__":
    main()
