"""Issue 16 item 2: notices about invalid guest messages cannot flood the frontend or the log.

Guest code finds its REPL's frame channel and sends forged frames of a megabyte each (an
unknown message type made of a megabyte of text). Each becomes a short notice quoting at most
200 characters and the frame's size; the frontend gets at most 5 per cell and then one count;
the kernel log gets at most 5 such lines a minute. Pure parts (quote, LogLimiter) are tested
without a kernel.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import (  # noqa: E402
    BACKEND,
    START_TIMEOUT,
    Kernel,
    LocalKernelspecs,
    stderr_of,
    stdout_of,
)

from supermachine_kernel.kernel.iopub import LogLimiter, quote  # noqa: E402

KERNEL = "smk-security-notices"
_SPECS = LocalKernelspecs("notice", {KERNEL: []})

FRAMES = 30
FRAME_BYTES = 1_000_000

# Finds the REPL driver's channel to the host and sends forged frames through it.
FORGE = f"""
import gc
channel = next(o for o in gc.get_objects()
               if type(o).__name__ == "Channel" and hasattr(o, "input_replies"))
for i in range({FRAMES}):
    channel.send({{"type": "forged%03d" % i + "A" * {FRAME_BYTES}}})
print("sent")
"""


def test_quote_keeps_the_start_and_says_the_size():
    assert quote("short") == "short"
    q = quote("x" * 5000)
    assert q.startswith("x" * 200) and q.endswith("... (5000 characters)") and len(q) < 240


def test_log_limiter_lets_a_burst_through_per_cause_then_counts():
    lim = LogLimiter(burst=2, window=60)
    assert [lim.allow("a", t) for t in (0, 1, 2, 3)] == [0, 0, None, None]
    assert lim.allow("b", 4) == 0  # causes are counted apart
    assert lim.allow("a", 61) == 2  # the next window: says how many were left out
    assert lim.allow("a", 62) == 0


class _LoggedKernel(Kernel):
    """A test kernel whose own log (its stderr) goes to a file."""

    def __init__(self, log_path: str) -> None:
        _SPECS.use()
        self._log = open(log_path, "wb")
        self.km = KernelManager(kernel_name=KERNEL)
        self.km.start_kernel(stderr=self._log)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=START_TIMEOUT)
        self.flush()

    def shutdown(self) -> None:
        super().shutdown()
        self._log.close()


@pytest.fixture(scope="module")
def logged_kernel(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("notices") / "kernel.log")
    k = _LoggedKernel(log)
    yield k, log
    k.shutdown()


@pytest.mark.skipif(BACKEND != "vm", reason="forges frames from inside a microVM")
@pytest.mark.vm
def test_forged_megabyte_frames_become_short_counted_notices(logged_kernel):
    k, log = logged_kernel
    log_before = os.path.getsize(log)
    reply, outputs = k.execute(FORGE, timeout=120)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == "sent\n"
    err = stderr_of(outputs)
    notices = [line for line in err.splitlines() if "dropped an invalid" in line]
    # The first five are shown, each short and naming the frame's size; then one count.
    assert len(notices) == 5, err[:3000]
    for line in notices:
        assert len(line) < 800, line[:300]
        size = re.search(r"\((\d+) bytes\)", line)
        assert size and FRAME_BYTES < int(size.group(1)) < FRAME_BYTES + 100, line
    assert f"{FRAMES - 5} more invalid messages from the guest were dropped" in err
    assert len(err) < 10_000, len(err)

    # The kernel log: at most five such lines, none of them long.
    k.execute("1", timeout=60)  # the log is written by then
    with open(log, "rb") as f:
        f.seek(log_before)
        written = f.read().decode(errors="replace")
    lines = [line for line in written.splitlines() if "dropped an invalid" in line]
    assert 1 <= len(lines) <= 5, written[:3000]
    assert max(len(line) for line in lines) < 1000
    assert len(written) < 20_000, len(written)
    print(f"\n{FRAMES} forged frames of {FRAME_BYTES} bytes: {len(err)} bytes of notices on the "
          f"frontend, {len(written)} bytes in the kernel log")
