"""Restart gives a fresh guest; shutdown leaves nothing running."""
from __future__ import annotations

import time

from .harness import KERNEL, START_TIMEOUT, Kernel


def test_restart_gives_fresh_guest():
    k = Kernel(KERNEL)
    try:
        k.execute("secret_value = 1234")
        assert k.value("secret_value") == "1234"
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=START_TIMEOUT)
        k.flush()
        reply, outputs = k.execute("secret_value")
        assert reply["status"] == "error"
        assert reply["ename"] == "NameError"
        assert k.value("1+1") == "2"
    finally:
        k.shutdown()


def test_shutdown_reply_and_process_exit():
    k = Kernel(KERNEL)
    msg_id = k.kc.shutdown()  # sent on the control channel
    reply = k.kc.control_channel.get_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = k.kc.control_channel.get_msg(timeout=30)
    assert reply["msg_type"] == "shutdown_reply"
    assert reply["content"]["status"] == "ok"
    k.km.shutdown_kernel(now=False)
    assert not k.km.is_alive()
    k.kc.stop_channels()


def test_shutdown_request_ends_the_process_promptly():
    """The process exits right after its shutdown_reply, every time (ipykernel's close() races
    the control thread's last flush unless the exit waits for that thread: lifecycle.py)."""

    for _ in range(3):
        k = Kernel(KERNEL)
        try:
            assert k.value("1+1") == "2"
            process = k.km.provisioner.process
            k.km.request_shutdown()
            deadline = time.monotonic() + 5
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert process.poll() is not None, "the kernel did not exit within 5 s of shutdown"
        finally:
            k.kc.stop_channels()
            k.km.shutdown_kernel(now=True)
