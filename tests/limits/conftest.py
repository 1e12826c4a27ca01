"""Limits tests. Kernels started here (test_kernel_limits.py) get their own kernelspec,
`smk-limits` (a private prefix on JUPYTER_PATH, no warm spares), a temporary Jupyter data dir,
and a limits file of the test's own through SUPERMACHINE_LIMITS_FILE, with its own state
directory and cgroup name: nothing touches the host's /etc/supermachine-kernel or the cgroups
of other kernels."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, Kernel, stderr_of, stdout_of

from supermachine_kernel.cli.install import install

KERNEL = "smk-limits"
_root = tempfile.mkdtemp(prefix="smk-limits-specs-")
install(prefix=_root, kernel_name=KERNEL, backend=BACKEND, interrupt_mode="message",
        display_name=f"Python (microVM, {BACKEND}, limits tests)",
        extra_args=["--MicroVMKernel.pool_min=0"])
SPECS = os.path.join(_root, "share", "jupyter")

__all__ = ["BACKEND", "KERNEL", "SPECS", "Kernel", "stderr_of", "stdout_of"]
