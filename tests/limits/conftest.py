"""Limits tests. Kernels started here (test_kernel_limits.py) get their own kernelspec,
`smk-limits` (a private prefix on JUPYTER_PATH, no warm spares), a temporary Jupyter data dir,
and a limits file of the test's own through SUPERMACHINE_LIMITS_FILE, with its own state
directory and cgroup name: nothing touches the host's /etc/supermachine-kernel or the cgroups
of other kernels."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, Kernel, LocalKernelspecs, stderr_of, stdout_of

KERNEL = "smk-limits"
SPECS = LocalKernelspecs("limits", {KERNEL: []}).path

__all__ = ["BACKEND", "KERNEL", "SPECS", "Kernel", "stderr_of", "stdout_of"]
