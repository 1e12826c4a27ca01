"""Settings for every test package.

The test kernels start in this repository's root (pytest's cwd), which is no notebook
directory: its files must not be synced into every test kernel's VM. So the workspace sync
(c.MicroVMKernel.workspace, default "sync") is off for kernels started by the tests unless a
test turns it on (tests/kernel/test_workspace*.py start theirs in a temporary directory with
--MicroVMKernel.workspace=sync). SUPERMACHINE_KERNEL_WORKSPACE set outside wins.
"""
import os

os.environ.setdefault("SUPERMACHINE_KERNEL_WORKSPACE", "off")
