"""Benchmark: the host egress proxy (core/runtime/src/net/, `_core.NetProxy`), host only.

Figures, same run: an HTTP download of --mb MiB from a local server, direct vs through the
proxy with a policy that allows it (MB/s, median of --n); the time to open a CONNECT tunnel
(policy check, resolution, connect) vs a direct TCP connect. The guest path (agent channel)
is not wired yet: these are the proxy's own costs.

Run: .venv/bin/python bench/net.py [--mb 256] [--n 5]
"""
from __future__ import annotations

import argparse
import socket
import threading
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--n", type=int, default=5)
    args = ap.parse_args()
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
