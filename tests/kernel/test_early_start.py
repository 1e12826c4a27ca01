"""Early start in a real kernel process: the second kernel with a command line answers its first
kernel_info before ipykernel is loaded, dispatches a first request of another kind, and (VM
backend) runs its cells in the VM it restored before its imports (early_start.py)."""
from __future__ import annotations

import queue
import time

import pytest
from jupyter_client.manager import KernelManager

from .harness import BACKEND, KERNEL, START_TIMEOUT, Kernel


def _reply(kc, msg_id: str, timeout: float = START_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


@pytest.fixture(scope="module")
def hinted():
    """A first kernel with this command line ran a cell: it left its launch hint."""
    k = Kernel(KERNEL)
    try:
        reply, _ = k.execute("1+1")
        assert reply["status"] == "ok"
        time.sleep(0.5)  # the hint is written right after the guest is ready
    finally:
        k.shutdown()


def _start() -> tuple[KernelManager, object]:
    km = KernelManager(kernel_name=KERNEL)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    return km, kc


def test_first_kernel_info_is_answered_before_the_kernel_is_loaded(hinted):
    km, kc = _start()
    try:
        early = _reply(kc, kc.kernel_info())
        kc.wait_for_ready(timeout=START_TIMEOUT)
        msg_id = kc.execute("40 + 2")
        assert _reply(kc, msg_id)["content"]["status"] == "ok"
        late = _reply(kc, kc.kernel_info())
        # Two senders: the early responder's session, then ipykernel's.
        assert early["header"]["session"] != late["header"]["session"]
        for field in ("protocol_version", "implementation", "implementation_version",
                      "language_info", "supported_features", "help_links"):
            assert early["content"][field] == late["content"][field], field
        assert "debugger" not in early["content"] or early["content"]["debugger"] is False
        if BACKEND == "vm":
            assert "restored at kernel start" in late["content"]["banner"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_a_first_request_other_than_kernel_info_is_still_served(hinted):
    km, kc = _start()
    try:
        msg_id = kc.execute("6 * 7")  # before any kernel_info: the early responder keeps it
        reply = _reply(kc, msg_id)
        assert reply["content"]["status"] == "ok"
        results = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "execute_result":
                results.append(msg["content"]["data"]["text/plain"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert results == ["42"]
        # and the kernel goes on answering normally
        assert _reply(kc, kc.kernel_info())["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
