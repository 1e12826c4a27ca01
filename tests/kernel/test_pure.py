"""Pure helpers of the kernel: death summaries and the iopub rate limiter."""
from __future__ import annotations

import logging

from supermachine_kernel.kernel.app import MicroVMKernelApp, raise_to_handler_level
from supermachine_kernel.kernel.errors import summarize_death
from supermachine_kernel.kernel.iopub import RateLimiter


def test_summarize_console_dump():
    reason = ("VmDiedError: VM died: the connection to the guest agent closed.\n"
              "QEMU exited with status 0\nlast guest console lines:\n"
              + "\n".join(f"[ 1.{i}] noise {i}" for i in range(50))
              + "\n[ 2.0] Kernel panic - not syncing: sysrq triggered crash\n[ 2.1] more noise")
    summary, details = summarize_death(reason)
    assert summary.startswith("VmDiedError: VM died")
    assert "Kernel panic" in summary
    assert len(details) <= 8
    assert len(summary) <= 501


def test_summarize_simple():
    assert summarize_death("the Python process in the guest exited with code 1") == (
        "the Python process in the guest exited with code 1.", [])
    assert summarize_death("") == ("no reason was reported.", [])


def test_rate_limiter_window():
    rl = RateLimiter(msg_rate=2, data_rate=100, window=1)
    assert rl.allow(10, 0.0) and rl.allow(10, 0.1)
    assert not rl.allow(10, 0.2)          # third message in the window
    assert rl.should_notice() and not rl.should_notice()
    assert rl.allow(10, 1.5)              # new window
    assert not rl.allow(200, 1.6)         # over the data budget
    dropped = rl.take_dropped()
    assert (dropped.messages, dropped.bytes) == (2, 210)
    assert rl.take_dropped().messages == 0


def test_rate_limiter_disabled():
    rl = RateLimiter(msg_rate=0, data_rate=0, window=3)
    assert all(rl.allow(10**9, t / 10) for t in range(1000))


def test_kernel_log_builds_no_debug_records_unless_asked():
    app = MicroVMKernelApp()
    try:
        assert not app.log.isEnabledFor(logging.DEBUG)  # the handler is at WARN by default
        assert app.log.isEnabledFor(logging.WARNING)
        app.log_level = "DEBUG"  # --debug: records are built and emitted again
        assert app.log.isEnabledFor(logging.DEBUG)
        app.log_level = "INFO"
        assert not app.log.isEnabledFor(logging.DEBUG) and app.log.isEnabledFor(logging.INFO)
    finally:
        MicroVMKernelApp.clear_instance()
    plain = logging.getLogger("supermachine-test-no-handlers")
    plain.propagate = False
    plain.setLevel(logging.DEBUG)
    raise_to_handler_level(plain)  # no handler: Python's last-resort handler (WARNING) decides
    assert plain.level == logging.WARNING
