"""Early start without a kernel process: launch hints, the wire helpers, the responder thread on
real sockets, and the early VM's hand-over rules (startup/responder.py, sequence.py, hint.py)."""
from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import zmq
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

from supermachine_kernel.startup import hint as launch_hint, responder as early_responder, sequence as early_start
from supermachine_kernel.startup.responder import EarlyResponder, message, parse_request, sign
from supermachine_kernel.startup.sequence import EarlyVm
from supermachine_kernel.startup.sockets import EarlySockets

KERNEL_INFO = {"protocol_version": "5.4", "implementation": "supermachine-kernel",
               "language_info": {"name": "python", "version": "3.11.2"}, "banner": "b"}


# -- launch hints -------------------------------------------------------------------------------


def test_hint_key_ignores_the_connection_file_and_unrelated_environment():
    env = {"HOME": "/h", "SUPERMACHINE_ACCEL": "tcg"}
    base = launch_hint.hint_key(["--MicroVMKernel.backend=vm", "-f", "/a.json"], env, "1")
    assert launch_hint.hint_key(["-f=/b.json", "--MicroVMKernel.backend=vm"], env, "1") == base
    assert launch_hint.hint_key(["--MicroVMKernel.backend=vm"], dict(env, PATH="/x"), "1") == base
    assert launch_hint.hint_key(["--MicroVMKernel.backend=local"], env, "1") != base
    assert launch_hint.hint_key(["--MicroVMKernel.backend=vm"], dict(env, SUPERMACHINE_ACCEL="kvm"), "1") != base
    assert launch_hint.hint_key(["--MicroVMKernel.backend=vm"], env, "2") != base
    assert launch_hint.kernel_args(["-f", "/c.json", "--x", "--f=/d.json", "-f=/e.json"]) == ["--x"]


def test_hint_round_trip_and_rejects(tmp_path):
    cache = str(tmp_path)
    assert launch_hint.read(cache, "k") is None
    launch_hint.write(cache, "k", KERNEL_INFO, "/snap")
    assert launch_hint.read(cache, "k") == {"format": launch_hint.FORMAT, "kernel_info": KERNEL_INFO,
                                            "snapshot": "/snap"}
    path = tmp_path / "launch-hints" / "k.json"
    for bad in ("not json", "[]", json.dumps({"format": 99, "kernel_info": KERNEL_INFO}),
                json.dumps({"format": launch_hint.FORMAT, "kernel_info": {"banner": "no version"}}),
                json.dumps({"format": launch_hint.FORMAT, "kernel_info": KERNEL_INFO, "snapshot": 3})):
        path.write_text(bad)
        assert launch_hint.read(cache, "k") is None, bad
    assert [p.name for p in path.parent.iterdir()] == ["k.json"]  # no temporary files left


def test_disabled_by_environment_and_without_a_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(early_start, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setenv("SUPERMACHINE_EARLY_START", "1")
    started = early_start.Startup.begin(["--x"])
    assert started.responder is None and started.vm is None and started.stop_responder() == []
    started.save_hint(KERNEL_INFO, None)
    assert launch_hint.read(str(tmp_path), started.key)["kernel_info"] == KERNEL_INFO
    before = sys.getswitchinterval()
    hinted = early_start.Startup.begin(["--x"])  # a hint now, but no snapshot and no sockets
    assert hinted.hint is not None and hinted.vm is None
    hinted.answer(None)
    assert hinted.responder is None
    assert sys.getswitchinterval() == early_start.EARLY_SWITCH_INTERVAL  # while ipykernel loads
    assert hinted.stop_responder() == [] and sys.getswitchinterval() == before
    launch_hint.write(str(tmp_path), started.key, KERNEL_INFO, str(tmp_path))
    monkeypatch.setenv("SUPERMACHINE_EARLY_START", "0")
    off = early_start.Startup.begin(["--x"])  # a hint with a snapshot, but turned off
    assert off.key == started.key and off.responder is None and off.vm is None


# -- wire helpers -------------------------------------------------------------------------------


def test_messages_interoperate_with_jupyter_client():
    key = b"secret-key"
    session = Session(key=key, signature_scheme="hmac-sha256")
    frames = message(key, "hmac-sha256", "s1", "5.4", "kernel_info_reply", {"status": "ok"},
                     {"msg_id": "p"}, (b"ident",))
    idents, rest = session.feed_identities(frames)
    msg = session.deserialize(rest)  # checks the signature
    assert idents == [b"ident"] and msg["msg_type"] == "kernel_info_reply"
    assert msg["parent_header"] == {"msg_id": "p"} and msg["content"] == {"status": "ok"}
    request = session.msg("kernel_info_request")
    wire = [b"client-id", *session.serialize(request)]
    parsed = parse_request(wire, key, "hmac-sha256")
    assert parsed is not None
    assert parsed[0] == [b"client-id"] and parsed[1]["msg_id"] == request["header"]["msg_id"]


def test_parse_refuses_what_is_not_a_signed_message():
    key = b"k"
    good = message(key, "hmac-sha256", "s", "5.4", "kernel_info_request", {}, {}, (b"id",))
    assert parse_request(good, key, "hmac-sha256") is not None
    assert parse_request(good, b"other", "hmac-sha256") is None
    assert parse_request([f for f in good if f != early_responder.DELIM], key, "hmac-sha256") is None
    assert parse_request(good[:-1], key, "hmac-sha256") is None
    tampered = list(good)
    tampered[-1] = b'{"x": 1}'
    assert parse_request(tampered, key, "hmac-sha256") is None
    garbage = [b"id", early_responder.DELIM, sign(key, "hmac-sha256", [b"{", b"{}", b"{}", b"{}"]),
               b"{", b"{}", b"{}", b"{}"]
    assert parse_request(garbage, key, "hmac-sha256") is None
    unsigned = message(b"", "hmac-sha256", "s", "5.4", "kernel_info_request", {}, {})
    assert unsigned[1] == b"" and parse_request(unsigned, b"", "hmac-sha256") is not None


# -- the responder on real sockets --------------------------------------------------------------


@pytest.fixture
def wired(tmp_path):
    path, info = write_connection_file(str(tmp_path / "kernel.json"))
    sockets = EarlySockets.bind(["-f", path])
    assert sockets is not None and sockets.key == info["key"].encode()
    ctx = zmq.Context()
    shell = ctx.socket(zmq.DEALER)
    shell.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
    session = Session(key=sockets.key, signature_scheme=sockets.signature_scheme)
    yield sockets, shell, sub, session
    shell.close(linger=0)
    sub.close(linger=0)
    ctx.term()
    sockets.close()


def _recv(sock, session, timeout=5.0) -> dict:
    assert sock.poll(int(timeout * 1000)), "nothing received"
    _, rest = session.feed_identities(sock.recv_multipart())
    return session.deserialize(rest)


def test_responder_answers_kernel_info_and_welcomes_subscribers(wired):
    sockets, shell, sub, session = wired
    responder = EarlyResponder(sockets.shell, sockets.iopub, sockets.key,
                               sockets.signature_scheme, KERNEL_INFO)
    try:
        assert _recv(sub, session)["msg_type"] == "iopub_welcome"
        for _ in range(2):  # jupyter_client's wait_for_ready, then the frontend's own
            session.send(shell, "kernel_info_request", {})
            reply = _recv(shell, session)
            assert reply["msg_type"] == "kernel_info_reply"
            assert reply["content"] == dict(KERNEL_INFO, status="ok")
            states = [_recv(sub, session) for _ in range(2)]
            assert [m["content"]["execution_state"] for m in states] == ["busy", "idle"]
            assert all(m["parent_header"]["msg_id"] == reply["parent_header"]["msg_id"]
                       for m in states)
    finally:
        assert responder.stop() == []
    assert responder.answered


def _kept(responder, n: int) -> list:
    deadline = time.monotonic() + 5
    while len(responder.stash) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return responder.stop()


def test_other_requests_are_kept_for_the_kernel_and_marked_busy_at_once(wired):
    """jupyter console takes any idle of its session for the end of the cell it sent: the
    kept execute_request's busy must follow the kernel_info's idle at once, or a first cell
    calling input() hangs the console."""
    sockets, shell, sub, session = wired
    responder = EarlyResponder(sockets.shell, sockets.iopub, sockets.key,
                               sockets.signature_scheme, KERNEL_INFO)
    assert _recv(sub, session)["msg_type"] == "iopub_welcome"
    session.send(shell, "kernel_info_request", {})
    assert _recv(shell, session)["msg_type"] == "kernel_info_reply"
    execute = session.send(shell, "execute_request", {"code": "x = input()"})
    # A kernel_info after a kept request is kept too: replies stay in request order.
    info = session.send(shell, "kernel_info_request", {})
    stash = _kept(responder, 2)
    states = [_recv(sub, session) for _ in range(4)]
    assert [(m["parent_header"].get("msg_type"), m["content"]["execution_state"])
            for m in states] == [("kernel_info_request", "busy"), ("kernel_info_request", "idle"),
                                 ("execute_request", "busy"), ("kernel_info_request", "busy")]
    assert states[2]["parent_header"]["msg_id"] == execute["header"]["msg_id"]
    kept = [session.deserialize(session.feed_identities(f)[1]) for f in stash]
    assert [m["header"]["msg_id"] for m in kept] == [execute["header"]["msg_id"],
                                                     info["header"]["msg_id"]]
    assert not shell.poll(200)  # nothing else was answered


def test_a_first_request_of_another_kind_is_kept_for_the_kernel(wired):
    sockets, shell, _, session = wired
    responder = EarlyResponder(sockets.shell, sockets.iopub, sockets.key,
                               sockets.signature_scheme, KERNEL_INFO)
    session.send(shell, "execute_request", {"code": "1+1"})
    stash = _kept(responder, 1)
    assert len(stash) == 1 and not responder.answered
    _, rest = session.feed_identities(stash[0])
    assert session.deserialize(rest)["content"] == {"code": "1+1"}
    assert not shell.poll(200)  # nothing was answered


def test_at_most_max_kept_requests_are_read(wired, monkeypatch):
    monkeypatch.setattr(early_responder, "MAX_KEPT", 3)
    sockets, shell, _, session = wired
    responder = EarlyResponder(sockets.shell, sockets.iopub, sockets.key,
                               sockets.signature_scheme, KERNEL_INFO)
    for i in range(5):
        session.send(shell, "execute_request", {"code": str(i)})
    deadline = time.monotonic() + 5
    while len(responder.stash) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # time enough to read the other two, were there no cap
    assert len(responder.stop()) == 3
    assert sockets.shell.poll(1000)  # the rest still queued on the socket the kernel takes over


def test_a_badly_signed_kernel_info_is_not_answered(wired):
    sockets, shell, _, _ = wired
    responder = EarlyResponder(sockets.shell, sockets.iopub, sockets.key,
                               sockets.signature_scheme, KERNEL_INFO)
    forged = Session(key=b"wrong", signature_scheme="hmac-sha256")
    forged.send(shell, "kernel_info_request", {})
    deadline = time.monotonic() + 5
    while not responder.stash and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(responder.stop()) == 1  # ipykernel rejects (and logs) it as usual
    assert not responder.answered and not shell.poll(200)


# -- the early VM's hand-over -------------------------------------------------------------------


class FakeVm:
    def __init__(self, alive=True):
        self.alive = alive
        self.released = 0

    def release(self):
        self.released += 1


def _early_vm(monkeypatch, tmp_path, vm, gate=None, fail=None):
    own = str(tmp_path / "snap")

    def restore(snapshot):
        # An earlier test's early VM whose thread reaches the (patched) module function only
        # now, under load, must not get this test's FakeVm (it would release it once more).
        if snapshot != own:
            raise RuntimeError(f"not this test's snapshot: {snapshot}")
        if gate is not None:
            gate.wait(5)
        if fail is not None:
            raise fail
        return vm, "child"

    monkeypatch.setattr(early_start, "restore_and_attach", restore)
    (tmp_path / "snap").mkdir(exist_ok=True)
    return EarlyVm(own)


def test_early_vm_is_taken_only_for_its_own_snapshot(monkeypatch, tmp_path):
    vm = FakeVm()
    early = _early_vm(monkeypatch, tmp_path, vm)
    taken = early.take(str(tmp_path / "snap" / "."))
    assert taken is not None and taken[0]._vm is vm and taken[1] == "child"  # wrapped in api.Vm
    assert early.take(str(tmp_path / "snap")) is None and vm.released == 0  # taken once
    other = FakeVm()
    early = _early_vm(monkeypatch, tmp_path, other)
    assert early.take(str(tmp_path / "elsewhere")) is None
    deadline = time.monotonic() + 5
    while other.released == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.released == 1  # a VM of another snapshot is released, not leaked
    early = _early_vm(monkeypatch, tmp_path, FakeVm())
    assert early.take(None) is None  # a configuration without snapshots


def test_early_vm_released_before_ready_is_released_when_ready(monkeypatch, tmp_path):
    gate = threading.Event()
    vm = FakeVm()
    early = _early_vm(monkeypatch, tmp_path, vm, gate=gate)
    early.release()
    gate.set()
    deadline = time.monotonic() + 5
    while vm.released == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vm.released == 1 and early.take(str(tmp_path / "snap")) is None


def test_failed_or_dead_early_vm_means_the_normal_path(monkeypatch, tmp_path):
    early = _early_vm(monkeypatch, tmp_path, FakeVm(), fail=RuntimeError("no QEMU"))
    assert early.take(str(tmp_path / "snap")) is None and "no QEMU" in str(early.error)
    dead = FakeVm(alive=False)
    early = _early_vm(monkeypatch, tmp_path, dead)
    assert early.take(str(tmp_path / "snap")) is None and dead.released == 1
