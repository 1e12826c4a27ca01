"""Traitlets config from Jupyter's config dirs reaches the kernel (supermachine_kernel_config.py)."""
from __future__ import annotations

import os

from .harness import KERNEL, Kernel


def test_config_file_in_jupyter_config_dir(tmp_path):
    (tmp_path / "supermachine_kernel_config.py").write_text(
        "c.MicroVMKernel.guest_env = {'FROM_CONFIG': 'yes'}\n"
        "c.MicroVMKernel.iopub_msg_rate_limit = 123.0\n")
    k = Kernel(KERNEL, env=dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path)))
    try:
        assert k.value("__import__('os').environ.get('FROM_CONFIG')") == "'yes'"
    finally:
        k.shutdown()
