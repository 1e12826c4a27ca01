"""The shell and iopub sockets the kernel process binds before its imports (startup/sockets.py)."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import zmq
from jupyter_client.connect import write_connection_file

from supermachine_kernel.startup.sockets import EarlySockets


def _app(info: dict, **over) -> SimpleNamespace:
    fields = dict(transport="tcp", ip=info["ip"], shell_port=info["shell_port"],
                  iopub_port=info["iopub_port"], curve_secretkey=None)
    fields.update(over)
    return SimpleNamespace(**fields)


def test_binds_shell_and_iopub_and_a_client_reaches_them(tmp_path):
    path, info = write_connection_file(str(tmp_path / "kernel-1.json"))
    early = EarlySockets.bind(["-f", path])
    assert early is not None
    try:
        assert early.matches(_app(info))
        assert not early.matches(_app(info, shell_port=info["shell_port"] + 1))
        assert not early.matches(_app(info, transport="ipc"))
        assert not early.matches(_app(info, curve_secretkey=b"k" * 40))
        # A frontend's request is queued on the early shell socket until someone reads it.
        client = early.context.socket(zmq.DEALER)
        client.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        client.send(b"kernel_info_request")
        assert early.shell.poll(5000)
        _, body = early.shell.recv_multipart()
        assert body == b"kernel_info_request"
        sub = early.context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
        assert early.iopub.poll(5000)  # the XPUB socket sees the subscription
        assert early.iopub.recv() == b"\x01"
        client.close(linger=0)
        sub.close(linger=0)
    finally:
        early.close()


def test_leaves_what_it_cannot_bind_to_ipykernel(tmp_path):
    assert EarlySockets.bind([]) is None
    assert EarlySockets.bind(["-f", str(tmp_path / "missing.json")]) is None
    ipc = tmp_path / "ipc.json"
    ipc.write_text(json.dumps({"transport": "ipc", "ip": str(tmp_path / "k"), "shell_port": 1,
                               "iopub_port": 2}))
    assert EarlySockets.bind(["-f", str(ipc)]) is None
    path, info = write_connection_file(str(tmp_path / "kernel-2.json"))
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    taken.bind(f"tcp://{info['ip']}:{info['shell_port']}")
    try:
        assert EarlySockets.bind(["-f", path]) is None  # port in use: ipykernel reports it
    finally:
        taken.close(linger=0)
    time.sleep(0.05)
    early = EarlySockets.bind(["-f", path])  # and the ports were not left bound by the failure
    assert early is not None
    early.close()


def test_curve_keys_encrypt_the_early_sockets(tmp_path):
    public, secret = zmq.curve_keypair()
    path, info = write_connection_file(str(tmp_path / "kernel-2.json"),
                                       curve_publickey=public, curve_secretkey=secret)
    early = EarlySockets.bind(["-f", path])
    assert early is not None
    try:
        assert early.matches(_app(info, curve_secretkey=secret))
        assert not early.matches(_app(info))  # an app without the key binds its own sockets
        endpoint = f"tcp://{info['ip']}:{info['shell_port']}"
        plain = early.context.socket(zmq.DEALER)
        plain.connect(endpoint)
        plain.send(b"not encrypted")
        assert not early.shell.poll(1000)  # the handshake fails: nothing arrives
        client = early.context.socket(zmq.DEALER)
        client_public, client_secret = zmq.curve_keypair()
        client.curve_serverkey, client.curve_publickey, client.curve_secretkey = (
            public, client_public, client_secret)
        client.connect(endpoint)
        client.send(b"kernel_info_request")
        assert early.shell.poll(5000)
        assert early.shell.recv_multipart()[-1] == b"kernel_info_request"
        plain.close(linger=0)
        client.close(linger=0)
    finally:
        early.close()
