"""Traitlets config from Jupyter's config dirs reaches the kernel (supermachine_kernel_config.py)."""
from __future__ import annotations

import os

from .harness import KERNEL, Kernel, stderr_of


def test_config_file_in_jupyter_config_dir(tmp_path):
    # A setting that does not change the guest (so no new snapshot is baked for this test).
    (tmp_path / "supermachine_kernel_config.py").write_text(
        "c.MicroVMKernel.iopub_data_rate_limit = 1000.0\n"
        "c.MicroVMKernel.rate_limit_window = 1.0\n")
    k = Kernel(KERNEL, env=dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path)))
    try:
        reply, outputs = k.execute("print('q' * 100_000)")
        assert reply["status"] == "ok"
        assert "iopub_data_rate_limit = 1000 bytes/s" in stderr_of(outputs)
    finally:
        k.shutdown()
