"""Kernel tests: every test here runs against the backend named by SUPERMACHINE_TEST_BACKEND.

`local` (default) runs the guest REPL as a host subprocess (fast, NOT isolated); `vm` runs it in
microVMs through supermachine_kernel.api. Test kernelspecs are installed into a private
JUPYTER_PATH at collection time, so nothing touches the user's Jupyter setup:
  smk-test         interrupt_mode message
  smk-test-signal  interrupt_mode signal
"""
from __future__ import annotations

import os
import tempfile

import pytest

from supermachine_kernel.install import install

from .harness import BACKEND, KERNEL, KERNEL_SIGNAL

# On 2 cores under TCG a warm spare VM per test kernel (importing pandas and matplotlib in the
# background) slows every test down; VM runs use cold starts unless SUPERMACHINE_TEST_SPARES=1.
_extra = []
if BACKEND == "vm" and os.environ.get("SUPERMACHINE_TEST_SPARES") != "1":
    _extra.append("--MicroVMKernel.pool_min=0")

_root = tempfile.mkdtemp(prefix="smk-kernelspecs-")
for name, mode in ((KERNEL, "message"), (KERNEL_SIGNAL, "signal")):
    install(prefix=_root, kernel_name=name, backend=BACKEND, interrupt_mode=mode,
            display_name=f"Python (microVM, {BACKEND}, {mode} interrupts)", extra_args=_extra)
os.environ["JUPYTER_PATH"] = os.path.join(_root, "share", "jupyter")


def pytest_report_header(config):
    return f"supermachine kernel backend: {BACKEND} (SUPERMACHINE_TEST_BACKEND)"


@pytest.fixture(scope="module")
def kernel():
    """One kernel per test module (message-mode interrupts)."""
    from .harness import Kernel

    k = Kernel(KERNEL)
    yield k
    k.shutdown()
