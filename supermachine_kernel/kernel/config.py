"""The kernel's guest settings: where and how the guest runs (`c.MicroVMKernel.<trait>`).

A class of its own so tools (the CLI's `prepare`, the kernelspec installer) read the guest
settings from Jupyter's config without constructing a kernel.
"""
from __future__ import annotations

import os
import sys
import typing as t

from traitlets import Dict, Float, Integer, List, Unicode, default
from traitlets.config import Configurable

from ..repl_client import make_backend


class GuestConfig(Configurable):
    """Where and how the guest runs. Set as `c.MicroVMKernel.<trait>` (the kernel inherits these).
    A separate class so tools can read the guest settings without constructing a kernel."""

    backend = Unicode(
        help="Where cells run: 'vm' (a microVM per kernel) or 'local' (a host subprocess; NOT "
        "isolated, for debugging). Default: $SUPERMACHINE_KERNEL_BACKEND or 'vm'."
    ).tag(config=True)

    @default("backend")
    def _backend_default(self) -> str:
        return os.environ.get("SUPERMACHINE_KERNEL_BACKEND", "vm")

    image = Unicode("default", help="Guest image: a name from `supermachine-kernel image list` "
                    "or a path.").tag(config=True)
    memory_mib = Integer(512, help="Guest RAM in MiB.").tag(config=True)
    vcpus = Integer(1, help="Guest vCPUs.").tag(config=True)
    pool_min = Integer(1, help="Warm VMs kept ready in this kernel's pool.").tag(config=True)
    pool_max = Integer(2, help="Most VMs this kernel's pool may hold.").tag(config=True)
    accelerator = Unicode("auto", help="auto, kvm or tcg.").tag(config=True)
    warmup_imports = List(
        Unicode(),
        ["IPython", "numpy", "pandas", "matplotlib", "matplotlib_inline.backend_inline",
         "ipywidgets"],
        help="Modules the image's warmup imports before its snapshot is taken.",
    ).tag(config=True)
    guest_env = Dict(
        help="Extra environment for the guest REPL. Nothing else from the kernel's environment "
        "reaches the guest."
    ).tag(config=True)
    local_python = Unicode(sys.executable, help="Python used by the local backend.").tag(config=True)
    startup_timeout = Float(180.0, help="Seconds to wait for the guest REPL to start.").tag(
        config=True
    )

    def backend_options(self) -> dict:
        return dict(
            python=self.local_python,
            image=self.image,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            pool_min=self.pool_min,
            pool_max=self.pool_max,
            accelerator=self.accelerator,
            warmup_imports=list(self.warmup_imports),
        )

    def make_backend(self) -> t.Any:
        return make_backend(self.backend, **self.backend_options())


