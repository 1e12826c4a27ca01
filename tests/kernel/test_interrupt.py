"""Interrupts reach the guest REPL in both interrupt modes; the kernel stays usable after."""
from __future__ import annotations

import threading
import time

import pytest

from .harness import KERNEL, KERNEL_SIGNAL, SLOW, Kernel


@pytest.fixture(scope="module", params=[KERNEL, KERNEL_SIGNAL], ids=["message", "signal"])
def any_mode_kernel(request):
    k = Kernel(request.param)
    yield k
    k.shutdown()


def _interrupt_after(k: Kernel, delay: float, marker: threading.Event | None = None) -> threading.Thread:
    def go():
        if marker is not None:
            marker.wait(30 * SLOW)
        time.sleep(delay)
        k.km.interrupt_kernel()

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(600)"],
                         ids=["busy-loop", "sleep"])
def test_interrupt_stops_cell(any_mode_kernel, code):
    k = any_mode_kernel
    started = threading.Event()
    _interrupt_after(k, 0.5, started)
    t0 = time.monotonic()
    reply, outputs = k.execute("print('started', flush=True)\n" + code, timeout=60,
                               on_iopub=lambda m: m["msg_type"] == "stream" and started.set())
    elapsed = time.monotonic() - t0
    assert reply["status"] == "error", reply
    assert reply["ename"] == "KeyboardInterrupt"
    assert any(m["msg_type"] == "error" for m in outputs)
    # 0.5 s delay + the interrupt itself: well within a second on the host
    assert elapsed < 0.5 + 1.0 * SLOW + 1.0, elapsed
    assert k.value("6*7") == "42"


def test_interrupt_stops_an_output_flood(any_mode_kernel):
    """The guest blocks a cell that prints faster than the host takes output; an interrupt
    still ends it, and what it printed before keeps its order."""
    k = any_mode_kernel
    started = threading.Event()
    _interrupt_after(k, 1.0, started)
    reply, outputs = k.execute(
        "import sys\ni = 0\nwhile True:\n    sys.stdout.write('%09d' % i + 'x' * 9990 + '\\n')\n"
        "    i += 1\n", timeout=120,
        on_iopub=lambda m: m["msg_type"] == "stream" and started.set())
    assert reply["status"] == "error", reply
    assert reply["ename"] == "KeyboardInterrupt"
    lines = "".join(m["content"]["text"] for m in outputs
                    if m["msg_type"] == "stream" and m["content"]["name"] == "stdout").splitlines()
    numbers = [int(line[:9]) for line in lines if len(line) == 9_999 and line[:9].isdigit()]
    assert numbers and numbers == sorted(numbers), "flood output out of order"
    assert k.value("6*7") == "42"


def test_interrupt_while_idle_is_harmless(any_mode_kernel):
    k = any_mode_kernel
    k.km.interrupt_kernel()
    time.sleep(0.3)
    assert k.value("'still here'") == "'still here'"


def test_interrupt_while_waiting_for_input(any_mode_kernel):
    k = any_mode_kernel
    requested = threading.Event()

    def on_input(req):
        requested.set()
        return None  # never answer

    _interrupt_after(k, 0.3, requested)
    reply, _ = k.execute("input('never answered: ')", allow_stdin=True, on_input=on_input, timeout=60)
    assert reply["status"] == "error"
    assert reply["ename"] == "KeyboardInterrupt"
    assert k.value("1+1") == "2"


def test_interrupt_reply_message_mode():
    """interrupt_request on the control channel gets an ok interrupt_reply."""
    k = Kernel(KERNEL)
    try:
        msg = k.kc.session.msg("interrupt_request", {})
        k.kc.control_channel.send(msg)
        reply = k.kc.control_channel.get_msg(timeout=10 * SLOW)
        while reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            reply = k.kc.control_channel.get_msg(timeout=10 * SLOW)
        assert reply["msg_type"] == "interrupt_reply"
        assert reply["content"]["status"] == "ok"
        assert k.value("2+2") == "4"
    finally:
        k.shutdown()
