"""Exposed ports (supermachine_kernel/expose.py, ``Vm.expose_tcp``): a guest TCP server reached
from the host's 127.0.0.1, on both backends (the agent on a unix socket, whose "guest" ports
are host ports, and a real microVM, whose are not). Guest servers: ``python3 -m http.server``,
an echo server and a server that floods its client."""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import types

import pytest

from supermachine_kernel import api
from supermachine_kernel import expose
from supermachine_kernel.expose import Exposure, Slots

from .conftest import UnixAgent
from .helpers import free_port, wait_until

ECHO = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def serve(c):
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

FLOOD = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
junk = bytes(range(256)) * 256
def serve(c):
    try:
        while True:
            c.sendall(junk)
    except OSError:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

BIG = 10 * 1024 * 1024


def get(x: Exposure, path: str = "/", timeout: float = 60.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", x.host_port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def serving(x: Exposure) -> bool:
    try:
        return get(x, "/hello.txt", timeout=30)[0] == 200
    except (OSError, http.client.HTTPException):
        time.sleep(0.3)
        return False


def echo_ready(x: Exposure) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=30) as s:
            s.sendall(b"ping")
            return s.recv(4) == b"ping"
    except OSError:
        time.sleep(0.3)
        return False


@pytest.fixture(scope="module", params=["unix", "unix-relay", "qemu"])
def served(request):
    """A VM (either backend) running an HTTP server over a directory holding ``hello.txt`` and
    a 10 MB random ``big.bin``, an echo server and a flood server, each exposed. "unix-relay":
    the guest relay process path (agents without the native TCP channel) on the unix agent."""
    backend, _, path = request.param.partition("-")
    native = expose.NATIVE
    expose.NATIVE = path != "relay"
    request.addfinalizer(lambda: setattr(expose, "NATIVE", native))
    vm: api.Vm = request.getfixturevalue(f"{backend}_vm")
    root = vm.exec(["python3", "-c", "import tempfile; print(tempfile.mkdtemp(prefix='sm-expose-'))"]).stdout.decode().strip()
    big = os.urandom(BIG)
    vm.write_file(f"{root}/hello.txt", b"hello from the guest\n")
    vm.write_file(f"{root}/big.bin", big)
    ports = {name: free_port() for name in ("http", "echo", "flood", "closed")}
    servers = [
        vm.spawn(["python3", "-m", "http.server", str(ports["http"]), "--bind", "127.0.0.1", "--directory", root]),
        vm.spawn(["python3", "-c", ECHO, str(ports["echo"])]),
        vm.spawn(["python3", "-c", FLOOD, str(ports["flood"])]),
    ]
    ns = types.SimpleNamespace(vm=vm, ports=ports, big_sha=hashlib.sha256(big).hexdigest(), backend=request.param)
    ns.http = vm.expose_tcp(ports["http"])
    ns.echo = vm.expose_tcp(ports["echo"])
    assert wait_until(lambda: serving(ns.http), 180), "the guest HTTP server never answered"
    assert wait_until(lambda: echo_ready(ns.echo), 180), "the guest echo server never answered"
    yield ns
    ns.http.close()
    ns.echo.close()
    for s in servers:
        try:
            s.signal(9)
            s.wait(timeout=30)
        except api.VmError:
            pass
    vm.exec(["rm", "-rf", root])


def test_fetch_through_the_host_port(served):
    x = served.http
    assert x.url == f"http://127.0.0.1:{x.host_port}/"
    assert x._sock.getsockname()[0] == "127.0.0.1", "the host side listens on loopback only"
    status, body = get(x, "/hello.txt")
    assert (status, body) == (200, b"hello from the guest\n")
    assert x in served.vm.exposures


def test_two_concurrent_connections(served):
    x = served.echo
    a = socket.create_connection(("127.0.0.1", x.host_port), timeout=60)
    b = socket.create_connection(("127.0.0.1", x.host_port), timeout=60)
    try:
        a.sendall(b"first")
        b.sendall(b"second")
        assert b.recv(6) == b"second"
        assert a.recv(5) == b"first"
        assert wait_until(lambda: x.active >= 2, 10)
    finally:
        a.close()
        b.close()
    assert wait_until(lambda: x.active == 0, 60), "relays of closed connections must end"


def test_big_transfer_both_ways_is_intact(served):
    status, body = get(served.http, "/big.bin", timeout=300)
    assert status == 200 and len(body) == BIG
    assert hashlib.sha256(body).hexdigest() == served.big_sha
    # host → guest → host through the echo server, sending and reading at once (back-pressure
    # both ways: neither side may buffer it all).
    data = os.urandom(BIG)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", served.echo.host_port), timeout=300) as s:
        reader = threading.Thread(target=lambda: _read_n(s, BIG, got))
        reader.start()
        s.sendall(data)
        reader.join(timeout=600)
    assert len(got) == BIG and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def _read_n(s: socket.socket, n: int, into: bytearray) -> None:
    while len(into) < n:
        b = s.recv(1 << 16)
        if not b:
            return
        into += b


def test_stop_keeps_connections_in_flight(served):
    x = served.vm.expose_tcp(served.ports["echo"])
    s = socket.create_connection(("127.0.0.1", x.host_port), timeout=60)
    try:
        s.sendall(b"before")
        assert s.recv(6) == b"before"
        x.stop()
        assert not x.listening and x not in served.vm.exposures
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", x.host_port), timeout=10).close()
        s.sendall(b"after stop")
        assert s.recv(10) == b"after stop"
    finally:
        s.close()
    assert wait_until(lambda: x.active == 0, 60)


def test_closed_guest_port_gives_a_clean_close(served, caplog):
    x = served.vm.expose_tcp(served.ports["closed"])
    try:
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=120) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.recv(100) == b"", "EOF, not a hang and not data"
        assert wait_until(lambda: "in the guest failed" in caplog.text, 30), caplog.text
    finally:
        x.close()


def test_flooding_guest_is_bounded_and_its_slot_freed(served):
    x = served.vm.expose_tcp(served.ports["flood"])
    try:
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=60) as s:
            assert len(s.recv(1000)) > 0
            time.sleep(1)  # the guest keeps sending; nobody reads
        assert wait_until(lambda: x.active == 0, 60), "the relay must end when the host client leaves"
        assert echo_ready(served.echo), "other exposures are unaffected"
    finally:
        x.close()


def test_connection_cap_refuses_the_extra_one(served):
    x = Exposure(lambda: served.vm, served.ports["echo"], slots=Slots(1))
    try:
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=60) as a:
            a.sendall(b"one")
            assert a.recv(3) == b"one"
            with socket.create_connection(("127.0.0.1", x.host_port), timeout=60) as b:
                assert b.recv(10) == b"", "over the cap: closed at once"
            assert x.refused_total == 1
        assert wait_until(lambda: x.active == 0, 60)
        assert echo_ready(x), "the slot is free again"
    finally:
        x.close()


def test_bad_ports_are_refused(unix_vm):
    with pytest.raises(ValueError, match="1..65535"):
        unix_vm.expose_tcp(0)
    with pytest.raises(ValueError, match="1..65535"):
        unix_vm.expose_tcp(70000)
    with pytest.raises(TypeError):
        unix_vm.expose_tcp("8050")  # type: ignore[arg-type]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match="pick another host port"):
            unix_vm.expose_tcp(8050, host_port=taken.getsockname()[1])
    finally:
        taken.close()


def test_release_closes_exposures_and_their_connections():
    agent = UnixAgent()  # an agent of its own: the session's serves the shared unix_vm
    try:
        _release_closes(agent)
    finally:
        agent.stop()


def _release_closes(agent: UnixAgent) -> None:
    assert wait_until(agent.sock.exists, 10)
    vm = agent.attach()
    port = free_port()
    server = vm.spawn(["python3", "-c", ECHO, str(port)])
    x = vm.expose_tcp(port)
    assert wait_until(lambda: echo_ready(x), 60)
    s = socket.create_connection(("127.0.0.1", x.host_port), timeout=60)
    s.sendall(b"hi")
    assert s.recv(2) == b"hi"
    server.signal(9)
    vm.release()
    assert not x.listening
    assert s.recv(10) == b"", "the connection in flight was ended"
    s.close()
    assert wait_until(lambda: x.active == 0, 30)


def test_spare_relay_is_started_ahead_and_killed_by_stop(served, monkeypatch):
    monkeypatch.setattr(expose, "NATIVE", False)  # spares exist on the relay-process path only
    x = served.vm.expose_tcp(served.ports["echo"])
    try:
        assert wait_until(lambda: x._spare is not None, 60), "a spare guest relay waits for the first connection"
        spare = x._spare[1]
        assert echo_ready(x)
        assert spare.poll() is not None or x._spare is None or x._spare[1] is not spare, "the spare served the connection"
        assert wait_until(lambda: x._spare is not None, 60), "a new spare after the connection ended"
        spare = x._spare[1]
    finally:
        x.stop()
    assert x._spare is None
    assert wait_until(lambda: spare.poll() is not None, 60), "stop() kills the spare"


def test_pooled_vm_exposure_ends_when_the_vm_goes_back(image):
    pool = image.pool(min=1, max=1)
    try:
        vm = pool.acquire()
        port = free_port()
        vm.spawn(["python3", "-c", ECHO, str(port)])
        x = vm.expose_tcp(port)
        assert wait_until(lambda: echo_ready(x), 180)
        s = socket.create_connection(("127.0.0.1", x.host_port), timeout=60)
        s.sendall(b"pooled")
        assert s.recv(6) == b"pooled"
        vm.release()  # the VM goes back to the pool (and is restored fresh for the next user)
        assert not x.listening
        assert s.recv(10) == b"", "the next user of the pool's VM must not inherit the connection"
        s.close()
        assert wait_until(lambda: x.active == 0, 30)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", x.host_port), timeout=10).close()
    finally:
        pool.shutdown()


SILENT = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
held = []
while True:
    held.append(s.accept()[0])  # never answers, never closes
"""


def test_silent_guest_after_host_close_frees_the_slot(unix_vm, monkeypatch):
    monkeypatch.setattr(expose, "HALF_CLOSED_IDLE", 1.0)
    monkeypatch.setattr(expose, "POLL", 0.2)
    port = free_port()
    server = unix_vm.spawn(["python3", "-c", SILENT, str(port)])

    def listening() -> bool:  # the unix backend's guest ports are the host's
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return True
        except OSError:
            return False

    assert wait_until(listening, 60)
    x = unix_vm.expose_tcp(port)
    try:
        s = socket.create_connection(("127.0.0.1", x.host_port), timeout=30)
        s.sendall(b"anyone?")
        assert wait_until(lambda: x.active == 1, 30)
        time.sleep(1.5)
        assert x.active == 1, "a silent guest alone does not end a connection the host holds open"
        s.close()
        assert wait_until(lambda: x.active == 0, 30), "the relay ends after the host closed and the guest stayed silent"
    finally:
        x.close()
        server.signal(9)
