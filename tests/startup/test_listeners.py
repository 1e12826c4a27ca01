"""The listening sockets the kernel process opens in its first milliseconds (startup/listeners.py)
and their hand-over to ZMQ (startup/sockets.py EarlySockets.bind)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import zmq
from jupyter_client.connect import write_connection_file

from supermachine_kernel.startup.listeners import EarlyListeners, connection_file_arg, parse_json
from supermachine_kernel.startup.sockets import EarlySockets


def test_connection_file_argument_forms():
    assert connection_file_arg(["-f", "/a.json", "--x=1"]) == "/a.json"
    assert connection_file_arg(["--MicroVMKernel.backend=local", "-f=/b.json"]) == "/b.json"
    assert connection_file_arg(["--f=/c.json"]) == "/c.json"
    assert connection_file_arg(["--MicroVMKernel.backend=local"]) is None
    assert connection_file_arg(["-f"]) is None


@pytest.mark.parametrize("text", [
    '{"shell_port": 5, "ip": "127.0.0.1", "key": "a\\u00e9", "x": [1.5, true, null, -2e3]}',
    '  \n[1, {"a": {}}]\n\n',
    '"just a string"',
])
def test_parse_json_agrees_with_the_json_module(text):
    assert parse_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a": 1} trailing', '{"a": ', "", "{'a': 1}", "NaN-ish"])
def test_parse_json_rejects_what_the_json_module_rejects(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        parse_json(text)


def test_listening_module_imports_nothing_heavy():
    # The point of the module: it must not pull in json/socket/typing before the ports listen.
    code = ("import sys; import supermachine_kernel.startup.listeners; "
            "print(sorted({'json', 'socket', 'typing', 're', 'zmq'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _port_is_free(ip: str, port: int) -> bool:
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_a_frontend_connecting_before_zmq_is_served_once_zmq_takes_over(tmp_path):
    path, info = write_connection_file(str(tmp_path / "kernel-1.json"))
    listeners = EarlyListeners.listen(["-f", path])
    assert listeners is not None
    assert not _port_is_free(info["ip"], info["shell_port"])
    # The frontend connects and sends its request while nothing but the OS listens.
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    client.send(b"kernel_info_request")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
    early = EarlySockets.bind(["-f", path], listeners)
    assert early is not None
    try:
        assert early.shell.poll(5000)
        assert early.shell.recv_multipart()[1] == b"kernel_info_request"
        assert early.iopub.poll(5000)
        assert early.iopub.recv() == b"\x01"
        early.iopub.send(b"status")
        assert sub.poll(5000) and sub.recv() == b"status"
    finally:
        client.close(linger=0)
        sub.close(linger=0)
        ctx.term()
        early.close()
    assert _port_is_free(info["ip"], info["shell_port"])  # ZMQ closed the adopted socket


def test_what_zmq_does_not_take_is_closed_so_ipykernel_can_bind(tmp_path, monkeypatch):
    path, info = write_connection_file(str(tmp_path / "kernel-2.json"))
    listeners = EarlyListeners.listen(["-f", path])
    assert listeners is not None
    monkeypatch.setitem(sys.modules, "zmq", None)  # no ZMQ: the ports are left to ipykernel
    assert EarlySockets.bind(["-f", path], listeners) is None
    assert _port_is_free(info["ip"], info["shell_port"])
    assert _port_is_free(info["ip"], info["iopub_port"])


def test_leaves_what_it_cannot_listen_on_to_zmq(tmp_path):
    assert EarlyListeners.listen([]) is None
    assert EarlyListeners.listen(["-f", str(tmp_path / "missing.json")]) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert EarlyListeners.listen(["-f", str(bad)]) is None
    for ip in ("::1", "localhost", "*"):
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"transport": "tcp", "ip": ip, "shell_port": 1,
                                     "iopub_port": 2}))
        assert EarlyListeners.listen(["-f", str(other)]) is None, ip
    path, info = write_connection_file(str(tmp_path / "kernel-3.json"))
    taken = socket.socket()
    taken.bind((info["ip"], info["iopub_port"]))
    taken.listen(1)
    try:
        assert EarlyListeners.listen(["-f", path]) is None  # iopub port taken
        assert _port_is_free(info["ip"], info["shell_port"])  # and shell's was given back
    finally:
        taken.close()
