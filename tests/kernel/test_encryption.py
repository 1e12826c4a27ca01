"""Transport encryption as ipykernel does it: the kernelspec declares CurveZMQ, and a frontend that
provisions keys gets an encrypted kernel that does not warn about plain-text TCP."""
from __future__ import annotations

import json
import os

import zmq
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from .harness import KERNEL, START_TIMEOUT

WARNING = "Kernel is running over TCP without encryption"


def test_kernelspec_declares_curve():
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert spec.metadata.get("supported_encryption") == ["curve"]
    for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
        assert os.path.getsize(os.path.join(spec.resource_dir, logo)) > 0


def test_provisioned_keys_encrypt_and_silence_the_warning(tmp_path):
    km = KernelManager(kernel_name=KERNEL, transport_encryption="auto")
    with open(tmp_path / "stderr", "w") as err:
        km.start_kernel(stderr=err)
    try:
        with open(km.connection_file) as f:
            info = json.load(f)
        assert info.get("curve_secretkey") and info.get("curve_publickey")
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=START_TIMEOUT)
        reply = kc.execute_interactive("x = 6 * 7", timeout=START_TIMEOUT)
        assert reply["content"]["status"] == "ok"
        kc.stop_channels()
        # A client without the server's key gets nothing through.
        ctx = zmq.Context.instance()
        plain = ctx.socket(zmq.DEALER)
        plain.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        plain.send_multipart([b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"])
        assert not plain.poll(2000)
        plain.close(linger=0)
    finally:
        km.shutdown_kernel(now=False)
    log = (tmp_path / "stderr").read_text()
    assert WARNING not in log
