"""What a JupyterHub user's server loads from this package: a kernelspec manager whose
allowlist also holds for starting a kernel, not only for listing one.

jupyter_client's `KernelSpecManager.allowed_kernelspecs` filters `/api/kernelspecs`, but
`get_kernel_spec(name)`, which starts a kernel, still finds any installed kernelspec: a
request naming `python3` (ipykernel installs it beside itself) started the unisolated kernel.
deploy/jupyterhub/jupyterhub_config.py selects this class for every user's server.
"""
from __future__ import annotations

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel


class AllowlistKernelSpecManager(KernelSpecManager):
    """`KernelSpecManager` that refuses to hand out a kernelspec `allowed_kernelspecs` (when
    set) does not name, so no frontend or API request can start it."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if self.allowed_kernelspecs and kernel_name not in self.allowed_kernelspecs:
            self.log.warning("kernel %r is not in KernelSpecManager.allowed_kernelspecs (%s)",
                             kernel_name, ", ".join(sorted(self.allowed_kernelspecs)))
            raise NoSuchKernel(kernel_name)
        return super().get_kernel_spec(kernel_name)
