"""Settings for every test package.

The test kernels start in this repository's root (pytest's cwd), which is no notebook
directory: its files must not be synced into every test kernel's VM. So the workspace sync
(c.MicroVMKernel.workspace, default "sync") is off for kernels started by the tests unless a
test turns it on (tests/kernel/test_workspace*.py start theirs in a temporary directory with
--MicroVMKernel.workspace=sync). SUPERMACHINE_KERNEL_WORKSPACE set outside wins.

The `image` fixture is the default guest image, built (a cache hit after `make setup`) once
per run for every package whose tests boot VMs from it directly (runtime, machine, security,
faults).
"""
import os

import pytest

os.environ.setdefault("SUPERMACHINE_KERNEL_WORKSPACE", "off")


@pytest.fixture(scope="session")
def image():
    """The default image. Whether this run baked its snapshot (the bake VM would then be
    handed to the first boot) must not change what tests see: the seed is dropped, so every
    boot() is a real restore."""
    from supermachine_kernel import api

    img = api.Image.build(progress=False)
    seed = img._take_seed()
    if seed is not None:
        seed.release()
    return img
