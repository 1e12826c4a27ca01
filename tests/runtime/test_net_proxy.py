"""The host egress proxy (`_core.NetProxy`, runtime net/proxy.rs) against servers this test
starts on loopback. No VM: the proxy is host-side and not wired into the kernel yet.

Names resolve through the proxy's injected table. Loopback is always refused unless an address
entry lists it, so "ordinary" hosts resolve to TEST-NET addresses (198.51.100.x) that the
proxy's `test_route` sends to 127.0.0.1, where the test's servers listen.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from supermachine_kernel import _core

PUBLIC = "198.51.100.7"  # what allowed names resolve to; routed to 127.0.0.1 by the proxy
ROUTE = {PUBLIC: "127.0.0.1"}
RESOLVE = {
    "allowed.test": [PUBLIC],
    "sub.wild.test": [PUBLIC],
    "other.test": [PUBLIC],
    "rebind.test": ["127.0.0.1"],
    "meta.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.1", PUBLIC],
}


class _Origin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/big/"):
            body = b"x" * int(self.path.split("/")[2])
        else:
            body = f"origin saw {self.command} {self.path} host={self.headers.get('Host')} " \
                   f"proxy-conn={self.headers.get('Proxy-Connection')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    """A plain HTTP server on 127.0.0.1; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that echoes what it gets (stands in for a TLS server behind
    CONNECT); yields its port."""
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield lsock.getsockname()[1]
    stop.set()
    lsock.close()


def proxy(allow: list[str], **kw: object) -> _core.NetProxy:
    kw.setdefault("resolve", RESOLVE)
    kw.setdefault("test_route", ROUTE)
    return _core.NetProxy(allow, **kw)  # type: ignore[arg-type]


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Status, head and body (until the head's Content-Length, or EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, head, body


def connect(p: _core.NetProxy, target: str) -> tuple[socket.socket, int, bytes]:
    """Sends CONNECT target; returns the socket, the status and the body (empty on 200)."""
    s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:  # byte by byte: nothing of the tunnel is read
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1])
    body = b""
    if status != 200:  # refusals close the connection after the body
        while chunk := s.recv(65536):
            body += chunk
    return s, status, body


def http_get(p: _core.NetProxy, url: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
                  f"Proxy-Connection: keep-alive\r\n\r\n".encode())
        status, _, body = read_response(s)
        return status, body


def refusal(target: str) -> str:
    return (f"network access to {target} is not allowed by this kernel's policy; an admin can "
            f"allow it with c.MicroVMKernel.allow_network = [\"{target}\"]")


def test_connect_to_allowed_name_relays_both_ways(echo: int) -> None:
    with proxy(["allowed.test", f"*.wild.test:{echo}"]) as p:
        for host in ("allowed.test", "sub.wild.test"):
            s, status, _ = connect(p, f"{host}:{echo}")
            with s:
                assert status == 200
                hello = b"\x16\x03\x01 client hello"
                s.sendall(hello)
                got = b""
                while len(got) < len(hello) and (chunk := s.recv(100)):
                    got += chunk
                assert got == hello


def test_plain_http_absolute_uri_is_forwarded_in_origin_form(origin: int) -> None:
    with proxy([f"allowed.test:{origin}"]) as p:
        status, body = http_get(p, f"http://allowed.test:{origin}/path?q=1")
        assert status == 200
        assert body == f"origin saw GET /path?q=1 host=allowed.test:{origin} proxy-conn=None".encode()


def test_refused_host_gets_403_with_the_policy_message(origin: int, echo: int) -> None:
    with proxy(["allowed.test"]) as p:
        s, status, body = connect(p, f"other.test:{echo}")
        s.close()
        assert status == 403
        assert body.decode().strip() == refusal(f"other.test:{echo}")
        status, body = http_get(p, f"http://other.test:{origin}/")
        assert status == 403
        assert body.decode().strip() == refusal(f"other.test:{origin}")


def test_port_outside_the_entry_is_refused(echo: int) -> None:
    with proxy([f"allowed.test:{echo + 1 if echo < 65535 else echo - 1}"]) as p:
        s, status, body = connect(p, f"allowed.test:{echo}")
        s.close()
        assert status == 403
        assert body.decode().strip() == refusal(f"allowed.test:{echo}")


def test_name_resolving_to_loopback_is_refused_unless_listed(echo: int) -> None:
    with proxy(["rebind.test", "meta.test"]) as p:
        s, status, body = connect(p, f"rebind.test:{echo}")
        s.close()
        assert status == 403
        assert "it resolves to 127.0.0.1, the host's loopback" in body.decode()
        assert f'allow_network = ["127.0.0.1/32:{echo}"]' in body.decode()
        s, status, body = connect(p, f"meta.test:{echo}")
        s.close()
        assert status == 403
        assert "169.254.169.254, the cloud metadata service" in body.decode()
    with proxy([f"127.0.0.1/32:{echo}"]) as p:
        s, status, _ = connect(p, f"rebind.test:{echo}")
        with s:
            assert status == 200
            s.sendall(b"ping")
            assert s.recv(10) == b"ping"


def test_a_name_with_a_refused_and_an_allowed_address_connects_only_to_the_allowed(echo: int) -> None:
    # mixed.test -> [127.0.0.1, PUBLIC]: 127.0.0.1 (where the echo server listens) is refused;
    # PUBLIC is checked and used, and routed to 127.0.0.2 where nothing listens: 502, not 200.
    with proxy(["mixed.test"], test_route={PUBLIC: "127.0.0.2"}, connect_timeout=5.0) as p:
        s, status, body = connect(p, f"mixed.test:{echo}")
        s.close()
        assert status == 502, body
        assert f"cannot connect to mixed.test:{echo}" in body.decode()


def test_numeric_ip_and_ipv6_literals_are_refused(echo: int, origin: int) -> None:
    with proxy(["*"]) as p:
        for target in (f"127.0.0.1:{echo}", f"[::1]:{echo}", f"198.51.100.7:{echo}",
                       "169.254.169.254:80", f"[::ffff:127.0.0.1]:{echo}", "[fd00:ec2::254]:80"):
            s, status, body = connect(p, target)
            s.close()
            assert status == 403, target
            assert body.decode().startswith(f"network access to {target} is not allowed"), body
        status, body = http_get(p, f"http://127.0.0.1:{origin}/")
        assert status == 403
        status, body = http_get(p, f"http://[::1]:{origin}/")
        assert status == 403


def test_explicit_loopback_literal_is_allowed(echo: int) -> None:
    with proxy([f"127.0.0.1:{echo}"]) as p:
        s, status, _ = connect(p, f"127.0.0.1:{echo}")
        with s:
            assert status == 200
            s.sendall(b"hi")
            assert s.recv(10) == b"hi"


def test_connection_cap(echo: int) -> None:
    with proxy(["allowed.test"], max_connections=2) as p:
        a, sa, _ = connect(p, f"allowed.test:{echo}")
        b, sb, _ = connect(p, f"allowed.test:{echo}")
        assert (sa, sb) == (200, 200)
        c, sc, body = connect(p, f"allowed.test:{echo}")
        c.close()
        assert sc == 503
        assert "limit" in body.decode()
        a.close()
        deadline = time.monotonic() + 30
        while True:  # the freed slot comes back once the proxy sees the close
            d, sd, _ = connect(p, f"allowed.test:{echo}")
            d.close()
            if sd == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sd == 200
        b.close()


def test_flood_of_connections_to_an_allowed_host(echo: int) -> None:
    with proxy(["allowed.test"], max_connections=8) as p:
        opened = [connect(p, f"allowed.test:{echo}") for _ in range(40)]
        statuses = [status for _, status, _ in opened]
        assert statuses.count(200) == 8
        assert statuses.count(503) == 32
        assert p.active_connections <= 8
        for s, _, _ in opened:
            s.close()
        assert wait_for(lambda: p.active_connections == 0)
        s, status, _ = connect(p, f"allowed.test:{echo}")
        s.close()
        assert status == 200


def test_bandwidth_cap(origin: int) -> None:
    rate, size = 100_000, 300_000
    with proxy(["allowed.test"], bandwidth=rate) as p:
        t0 = time.monotonic()
        status, body = http_get(p, f"http://allowed.test:{origin}/big/{size}")
        elapsed = time.monotonic() - t0
    assert status == 200
    assert len(body) == size
    # The bucket's burst is a tenth of a second: at least (size / rate - 0.1) s; assert half.
    assert elapsed >= (size / rate - 0.1) / 2, elapsed


def test_garbage_gets_400_and_is_closed() -> None:
    with proxy(["allowed.test"]) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(b"\x00\xff\x16\x03garbage\r\n\r\n")
            status, _, body = read_response(s)
            assert status == 400
            assert b"network proxy" in body
            assert s.recv(10) == b""
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = read_response(s)
            assert status == 405
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20_000)
            status, _, _ = read_response(s)
            assert status == 431


def test_half_open_client_times_out() -> None:
    with proxy(["allowed.test"], head_timeout=0.5) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n")  # never finishes the head
            status, _, _ = read_response(s)
            assert status == 408
            assert s.recv(10) == b""
        assert wait_for(lambda: p.active_connections == 0)


def test_idle_relay_is_closed(echo: int) -> None:
    with proxy(["allowed.test"], idle_timeout=0.5) as p:
        s, status, _ = connect(p, f"allowed.test:{echo}")
        with s:
            assert status == 200
            s.settimeout(30)
            assert s.recv(10) == b""  # the proxy closed the silent tunnel
        assert wait_for(lambda: p.active_connections == 0)


def test_close_cuts_open_tunnels(echo: int) -> None:
    p = proxy(["allowed.test"])
    s, status, _ = connect(p, f"allowed.test:{echo}")
    assert status == 200
    p.close()
    p.close()
    s.settimeout(30)
    assert s.recv(10) == b""
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=5)


def test_bad_entries_and_arguments() -> None:
    _core.check_allow_network(["pypi.org", "files.pythonhosted.org", "*.example.com:443",
                               "10.1.0.0/16:5432", "[2001:db8::/32]:443"])
    with pytest.raises(ValueError, match=r'bad allow_network entry "http://pypi.org": it looks like a URL'):
        _core.check_allow_network(["pypi.org", "http://pypi.org"])
    with pytest.raises(ValueError, match="bad allow_network entry"):
        _core.NetProxy(["10.0.0.1/8"])
    with pytest.raises(ValueError, match="max_connections"):
        _core.NetProxy([], max_connections=0)
    with pytest.raises(ValueError, match="head_timeout"):
        _core.NetProxy([], head_timeout=0)
    with pytest.raises(ValueError, match="not an IP address"):
        _core.NetProxy([], resolve={"a.test": ["nope"]})


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
