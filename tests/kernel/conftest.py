"""Kernel tests: every test here runs against the backend named by SUPERMACHINE_TEST_BACKEND.

`vm` runs the guest REPL in microVMs through supermachine_kernel.api (the default when the
compiled runtime and QEMU are present; marked `vm`); `local` runs it as a host subprocess (fast,
NOT isolated; the default otherwise). Test kernelspecs are installed into a private
JUPYTER_PATH at collection time, so nothing touches the user's Jupyter setup:
  smk-test         interrupt_mode message
  smk-test-signal  interrupt_mode signal
"""
from __future__ import annotations

import os
import tempfile

import pytest

from supermachine_kernel.cli.install import install, prepare

from .harness import BACKEND, KERNEL, KERNEL_SIGNAL, Kernel

# On 2 cores under TCG a warm spare VM per test kernel (importing pandas and matplotlib in the
# background) slows every test down; VM runs use cold starts unless SUPERMACHINE_TEST_SPARES=1.
_extra = []
if BACKEND == "vm" and os.environ.get("SUPERMACHINE_TEST_SPARES") != "1":
    _extra.append("--MicroVMKernel.pool_min=0")

_root = tempfile.mkdtemp(prefix="smk-kernelspecs-")
for name, mode in ((KERNEL, "message"), (KERNEL_SIGNAL, "signal")):
    install(prefix=_root, kernel_name=name, backend=BACKEND, interrupt_mode=mode,
            display_name=f"Python (microVM, {BACKEND}, {mode} interrupts)", extra_args=_extra)
# Prepended, so kernelspecs other test packages put on JUPYTER_PATH stay visible.
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    p for p in (os.path.join(_root, "share", "jupyter"), os.environ.get("JUPYTER_PATH")) if p)


def pytest_report_header(config):
    return f"supermachine kernel backend: {BACKEND} (SUPERMACHINE_TEST_BACKEND=local|vm)"


def pytest_collection_modifyitems(config, items):
    if BACKEND == "vm":
        here = os.path.dirname(__file__)
        no_kernel = ("test_pure.py", "test_handler_map.py", "test_comm_router.py")
        for item in items:
            path = str(item.fspath)
            if path.startswith(here) and os.path.basename(path) not in no_kernel:
                item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="module")
def kernel():
    """One kernel per test module (message-mode interrupts)."""
    k = Kernel(KERNEL)
    yield k
    k.shutdown()


@pytest.fixture(scope="session", autouse=True)
def baked_snapshot():
    """On VMs, bake the kernel's warm snapshot once before any test (a first bake takes minutes
    under TCG and would otherwise land inside some test's timeout)."""
    if BACKEND == "vm":
        prepare(KERNEL, timeout=1800)
