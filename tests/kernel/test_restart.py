"""Restart gives a fresh guest; shutdown leaves nothing running."""
from __future__ import annotations

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
