"""The agent's native TCP channel (runtime ``tcp`` module, agent ``tcp.rs``), both directions:
``Vm.forward_to_host`` (a guest connection reaches a host server the host code chose) and
``Vm.tcp_relay`` under exposed ports (a host connection reaches a guest server, no guest
process started). Against the real agent on a unix socket (its "guest" loopback is the
host's) and a real microVM; plus a fake guest that floods, to check the host's bounds."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from supermachine_kernel import api, expose

from .conftest import UnixAgent
from .helpers import connect_retry, free_port, wait_until
from .test_expose import ECHO, echo_ready
from .test_faults import FakeGuest, control, frame, read_frame


class EchoServer:
    """A host echo server on 127.0.0.1 that counts its connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            c.close()
            with self._lock:
                self.open -= 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo_server():
    s = EchoServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def agent():
    a = UnixAgent()
    assert wait_until(a.sock.exists, 10)
    yield a
    a.stop()


@pytest.fixture(scope="module")
def tvm(agent):
    vm = agent.attach()
    yield vm
    vm.release()


def echo_round_trip(s: socket.socket, data: bytes) -> bytes:
    got = bytearray()

    def reader() -> None:
        while len(got) < len(data):
            b = s.recv(1 << 16)
            if not b:
                return
            got.extend(b)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(data)
    t.join(timeout=300)
    return bytes(got)


# ---------------------------------------------------------------- guest -> host


def test_agent_advertises_tcp_channels(tvm):
    assert tvm.tcp_channels
    assert "tcp" in tvm._vm.agent_features


def test_forward_to_host_relays_both_ways_with_back_pressure(tvm, echo_server):
    gport = free_port()
    tvm.forward_to_host(gport, echo_server.port)
    with connect_retry(gport) as s:
        data = os.urandom(5 * 1024 * 1024)  # several windows each way, sent and read at once
        assert hashlib.sha256(echo_round_trip(s, data)).digest() == hashlib.sha256(data).digest()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b"", "the half-close crosses both ways"
    assert echo_server.accepted == 1
    tvm.stop_forward(gport)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gport), timeout=10).close()


def test_forward_is_idempotent_and_retargets(tvm, echo_server):
    other = EchoServer()
    gport = free_port()
    try:
        tvm.forward_to_host(gport, echo_server.port)
        tvm.forward_to_host(gport, echo_server.port)
        with connect_retry(gport) as s:
            assert echo_round_trip(s, b"one") == b"one"
        tvm.forward_to_host(gport, other.port)
        with connect_retry(gport) as s:
            assert echo_round_trip(s, b"two") == b"two"
        assert (echo_server.accepted, other.accepted) == (1, 1)
    finally:
        tvm.stop_forward(gport)
        other.close()


def test_connection_without_an_attached_host_side_is_closed(echo_server):
    """A second host connection to the same agent (like a restore: the agent still listens)
    that has not called forward_to_host: the guest's connection is closed, not relayed."""
    agent = UnixAgent()  # serves one host at a time: not the module's
    try:
        assert wait_until(agent.sock.exists, 10)
        _without_host_side(agent, echo_server)
    finally:
        agent.stop()


def _without_host_side(agent: UnixAgent, echo_server: EchoServer) -> None:
    gport = free_port()
    first = agent.attach()
    first.forward_to_host(gport, echo_server.port)
    first.release()  # detaches this host; the agent keeps listening
    second = agent.attach()
    try:
        with connect_retry(gport) as s:
            s.settimeout(30)
            try:
                s.sendall(b"anyone?")
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        assert echo_server.accepted == 0
        second.forward_to_host(gport, echo_server.port)  # re-attach
        with connect_retry(gport) as s:
            assert echo_round_trip(s, b"back") == b"back"
    finally:
        second.stop_forward(gport)
        second.release()


def test_closed_host_port_closes_the_guest_connection(tvm):
    gport, dead = free_port(), free_port()
    tvm.forward_to_host(gport, dead)
    try:
        with connect_retry(gport) as s:
            s.settimeout(30)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
    finally:
        tvm.stop_forward(gport)


def test_guest_connections_over_the_cap_are_closed_and_slots_come_back(tvm, echo_server):
    """Through the real agent: 100 guest connections held open to a forwarded port. The host
    relays at most 64 (counted from the agent's announcement), closes the others at once, and
    takes new ones again once the held ones are gone."""
    gport = free_port()
    tvm.forward_to_host(gport, echo_server.port)
    held = []
    try:
        for _ in range(100):
            held.append(connect_retry(gport))
        served = refused = 0
        for s in held:
            s.settimeout(30)
            try:
                s.sendall(b"x")
                got = s.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                got = b""
            if got == b"x":
                served += 1
            else:
                refused += 1
        assert (served, refused) == (64, 36)
        assert echo_server.accepted == 64
    finally:
        for s in held:
            s.close()
    try:
        assert wait_until(lambda: echo_server.open == 0, 30), "the relays end with their guest sides"
        with connect_retry(gport) as s:
            assert echo_round_trip(s, b"again") == b"again"
    finally:
        tvm.stop_forward(gport)


def test_bad_forward_arguments(tvm):
    with pytest.raises(ValueError, match="1..65535"):
        tvm.forward_to_host(0, 80)
    with pytest.raises(ValueError, match="1..65535"):
        tvm.forward_to_host(80, 70000)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(api.GuestError, match="listen on 127.0.0.1"):
            tvm.forward_to_host(taken.getsockname()[1], 80)
    finally:
        taken.close()


# ---------------------------------------------------------------- host -> guest (exposed ports)


def test_exposed_port_uses_the_native_channel(tvm):
    port = free_port()
    server = tvm.spawn(["python3", "-c", ECHO, str(port)])
    x = tvm.expose_tcp(port)
    try:
        assert wait_until(lambda: echo_ready(x), 60)
        assert x._spare is None, "no guest relay process is started ahead"
        before = {p["id"] for p in tvm.processes()}
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=60) as s:
            data = os.urandom(3 * 1024 * 1024)
            assert echo_round_trip(s, data) == data
            assert wait_until(lambda: x.active == 1, 10)
            assert {p["id"] for p in tvm.processes()} == before, "no process per connection"
        assert wait_until(lambda: x.active == 0, 30)
    finally:
        x.close()
        server.signal(9)


def test_native_expose_of_a_closed_port_is_a_clean_close(tvm, caplog):
    x = tvm.expose_tcp(free_port())
    try:
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=60) as s:
            assert s.recv(10) == b""
        assert wait_until(lambda: "in the guest failed" in caplog.text, 30), caplog.text
        assert wait_until(lambda: x.active == 0, 30)
    finally:
        x.close()


def test_close_ends_native_connections_in_flight(tvm):
    port = free_port()
    server = tvm.spawn(["python3", "-c", ECHO, str(port)])
    x = tvm.expose_tcp(port)
    try:
        assert wait_until(lambda: echo_ready(x), 60)
        s = socket.create_connection(("127.0.0.1", x.host_port), timeout=60)
        s.sendall(b"hi")
        assert s.recv(2) == b"hi"
        x.stop()
        s.sendall(b"still")
        assert s.recv(5) == b"still", "stop() keeps connections in flight"
        x.close()
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()
        assert wait_until(lambda: x.active == 0, 30)
    finally:
        x.close()
        server.signal(9)


# ---------------------------------------------------------------- a hostile guest

FEATURED_WELCOME = control({"op": "welcome", "version": 1, "boot_id": "fake", "generation": 1,
                            "processes": [], "features": ["tcp"]})


def _answer_listen(conn: socket.socket) -> int:
    """Reads frames until the TcpListen; answers Ok; returns its port."""
    while True:
        kind, _chan, payload = read_frame(conn)
        if kind == 1:
            import json
            msg = json.loads(payload)
            if msg["op"] == "tcp_listen":
                conn.sendall(control({"op": "ok", "req": msg["req"]}))
                return msg["port"]


def test_a_guest_flooding_channels_is_capped(echo_server):
    """The guest announces 300 connections at once and never reads: the host connects at most
    its cap (64) to the host port, refuses the rest with TcpClose, and stays responsive."""
    closes: list[int] = []
    done = threading.Event()

    def script(conn: socket.socket) -> None:
        import json
        read_frame(conn)  # hello
        conn.sendall(FEATURED_WELCOME)
        port = _answer_listen(conn)
        conn.sendall(b"".join(control({"op": "tcp_accepted", "id": i, "port": port}) for i in range(1, 301)))
        # data for ids nobody knows, and for refused ones: dropped, not fatal
        conn.sendall(frame(6, 99999, b"stray") + frame(6, 300, b"refused"))
        conn.settimeout(30)
        try:
            while len(closes) < 300 - 64:
                kind, chan, payload = read_frame(conn)
                if kind == 1:
                    msg = json.loads(payload)
                    if msg["op"] == "tcp_close":
                        closes.append(msg["id"])
                    elif msg["op"] == "ping":
                        conn.sendall(control({"op": "pong", "req": msg["req"]}))
        except (OSError, EOFError):
            pass
        done.set()
        time.sleep(5)

    g = FakeGuest(script)
    try:
        vm = api.Vm.attach_unix(g.path, timeout=5)
        vm.forward_to_host(3128, echo_server.port)
        assert done.wait(60), f"only {len(closes)} refusals"
        assert len(closes) == 300 - 64 and set(closes) == set(range(65, 301))
        assert wait_until(lambda: echo_server.accepted == 64, 30)
        time.sleep(0.5)
        assert echo_server.accepted == 64, "never more host connections than the cap"
        vm.release()
    finally:
        g.close()


def test_a_guest_overrunning_its_window_is_cut_off():
    """The host server never reads; the guest sends far more than its window without waiting
    for credit: the host buffers at most the window, then drops the connection."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(4)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(sink.accept()[0]), daemon=True).start()

    def script(conn: socket.socket) -> None:
        read_frame(conn)
        conn.sendall(FEATURED_WELCOME)
        port = _answer_listen(conn)
        conn.sendall(control({"op": "tcp_accepted", "id": 7, "port": port}))
        chunk = frame(6, 7, b"x" * 65536)
        try:
            for _ in range(16 * 32):  # 32 MiB, never waiting for credit
                conn.sendall(chunk)
        except OSError:
            pass
        time.sleep(5)

    g = FakeGuest(script)
    try:
        vm = api.Vm.attach_unix(g.path, timeout=5)
        vm.forward_to_host(3128, sink.getsockname()[1])
        with pytest.raises(api.ProtocolError, match="flow-control"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                vm._vm.ping(timeout=5)
                time.sleep(0.1)
    finally:
        g.close()
        sink.close()
        for c in held:
            c.close()


# ---------------------------------------------------------------- a real microVM


GUEST_CLIENT = r"""
import hashlib, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
data = bytes(range(256)) * (int(sys.argv[2]) // 256)
got = bytearray()
def rd():
    while len(got) < len(data):
        b = s.recv(65536)
        if not b:
            break
        got.extend(b)
t = threading.Thread(target=rd); t.start()
s.sendall(data); t.join()
print(len(got), hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest())
"""


def test_forward_to_host_from_a_guest_program(qemu_vm, echo_server):
    if not qemu_vm.tcp_channels:
        pytest.skip("the default image's agent predates TCP channels: re-bake with `supermachine-kernel prepare`")
    qemu_vm.forward_to_host(3128, echo_server.port)
    try:
        r = qemu_vm.exec(["python3", "-c", GUEST_CLIENT, "3128", str(2 * 1024 * 1024)], timeout_ms=300_000)
        assert r.exit_code == 0, r.stderr
        assert r.stdout.decode().split() == [str(2 * 1024 * 1024), "True"]
        assert echo_server.accepted == 1
    finally:
        qemu_vm.stop_forward(3128)


def test_exposed_port_of_a_real_guest_is_native(qemu_vm):
    if not qemu_vm.tcp_channels:
        pytest.skip("the default image's agent predates TCP channels: re-bake with `supermachine-kernel prepare`")
    port = free_port()
    server = qemu_vm.spawn(["python3", "-c", ECHO, str(port)])
    x = qemu_vm.expose_tcp(port)
    try:
        assert wait_until(lambda: echo_ready(x), 180)
        assert x._spare is None
        with socket.create_connection(("127.0.0.1", x.host_port), timeout=120) as s:
            data = os.urandom(1024 * 1024)
            assert echo_round_trip(s, data) == data
    finally:
        x.close()
        server.signal(9)


def test_native_switch_off_falls_back_to_relay_processes(tvm, monkeypatch):
    monkeypatch.setattr(expose, "NATIVE", False)
    port = free_port()
    server = tvm.spawn(["python3", "-c", ECHO, str(port)])
    x = tvm.expose_tcp(port)
    try:
        assert wait_until(lambda: echo_ready(x), 60)
        assert wait_until(lambda: x._spare is not None, 60), "the relay-process path starts a spare"
    finally:
        x.close()
        server.signal(9)
