"""The kernel's guest settings: where and how the guest runs (`c.MicroVMKernel.<trait>`).

A class of its own so tools (the CLI's `prepare`, the kernelspec installer) read the guest
settings from Jupyter's config without constructing a kernel.
"""
from __future__ import annotations

import os
import shlex
import sys
import typing as t

from traitlets import (
    Bool, Dict, Enum, Float, Integer, List, TraitError, Unicode, default, validate,
)
from traitlets.config import Configurable

from ..repl_client import make_backend

if t.TYPE_CHECKING:
    from ..workspace.scan import Limits


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

    image = Unicode("default", help="Guest image: a name from `supermachine-kernel image list`, "
                    "a root filesystem directory, or an OCI image (`python:3.12-slim`, "
                    "`oci:DIR:TAG`, ...), which gets the kernel layer. The kernel only uses an "
                    "image already built (`supermachine-kernel prepare --kernel NAME` builds "
                    "it); it never pulls or installs at start.").tag(config=True)
    packages = List(
        Unicode(),
        help="Packages installed into a layer of the (OCI) image, e.g. ['scikit-learn==1.6.1']. "
        "On the command line: --MicroVMKernel.packages=NAME, once per package.",
    ).tag(config=True)
    requirements = Unicode(
        "", help="A requirements file (host path) installed like `packages`."
    ).tag(config=True)
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
    guest_user = Unicode(
        "",
        help="Who the guest REPL, `!cmd`, %pip and everything they start run as inside the VM: "
        "'' = the OCI image config's User when it is not root, else 'jovyan' (uid 1000, gid "
        "100, home /home/jovyan, as Jupyter's docker stacks), with no capabilities and "
        "no_new_privs; it is added to the image when missing and owns /workspace and its "
        "home. 'root' = root with every right inside the VM (for images and admins that need "
        "it); 'image' = the image's User, root when it names none. Any other user name "
        "(created if missing) or uid[:gid] is used as given. "
        "supermachine_kernel/repl_client/guest_user.py.",
    ).tag(config=True)
    guest_env = Dict(
        help="Extra environment for the guest REPL. Nothing else from the kernel's environment "
        "reaches the guest."
    ).tag(config=True)
    local_python = Unicode(sys.executable, help="Python used by the local backend.").tag(config=True)
    startup_timeout = Float(180.0, help="Seconds to wait for the guest REPL to start.").tag(
        config=True
    )
    idle_suspend_after = Float(
        600.0, help="Seconds a kernel's guest may sit idle (no request, no output, its CPU quiet, "
        "no %expose port open) before its VM is snapshotted to disk and stopped, giving its "
        "memory back; the next request resumes it (variables, files and processes come back). "
        "0 = never. supermachine_kernel/machine/idle.py."
    ).tag(config=True)

    @validate("idle_suspend_after")
    def _check_idle_suspend_after(self, proposal: t.Any) -> float:
        value = float(proposal["value"])
        if value < 0:
            raise TraitError(f"c.MicroVMKernel.idle_suspend_after must be 0 (never) or a "
                             f"number of seconds, not {value}")
        return value
    allow_network = List(
        Unicode(),
        help="Where the guest may connect, checked on the host per connection by name and by "
        "resolved address: host names ('pypi.org', 'pypi.org:443'), wildcards ('*.example.com:443' "
        "= names under example.com), addresses and CIDRs ('10.1.0.0/16:5432', "
        "'[2001:db8::/32]:443'). The host's loopback, link-local and cloud metadata addresses "
        "are refused unless an address entry lists them. Default [] = no network at all. "
        "Programs in the guest reach it through the kernel's HTTP proxy (HTTP(S)_PROXY are set "
        "for them): pip, requests, urllib, curl; see docs/issue13-network.md.",
    ).tag(config=True)
    network_max_connections = Integer(
        64, help="Most network connections the guest may have open at once (with "
        "allow_network); those over it are refused and the cell says so.").tag(config=True)
    network_bandwidth = Integer(
        0, help="Bytes per second all the guest's network connections may move together, both "
        "directions (with allow_network); 0 = no cap.").tag(config=True)

    network_ca_certificates = Unicode(
        "", help="A PEM file of CA certificates (host path) the guest trusts instead of its own "
        "for HTTPS, with allow_network: needed behind a TLS-inspecting proxy, e.g. the host's "
        "/etc/ssl/certs/ca-certificates.crt when the host's own bundle holds that proxy's CA. "
        "Certificates only (a file with a private key is refused); '' = the guest's own CAs."
    ).tag(config=True)

    @validate("network_ca_certificates")
    def _check_network_ca(self, proposal: t.Any) -> str:
        from .network import NetworkError, read_ca_certificates  # noqa: PLC0415 - when set

        path = str(proposal["value"])
        if path:
            try:
                read_ca_certificates(path)
            except NetworkError as e:
                raise TraitError(f"c.MicroVMKernel.network_ca_certificates: {e}") from None
        return path

    @validate("network_max_connections", "network_bandwidth")
    def _check_network_caps(self, proposal: t.Any) -> int:
        name, value = proposal["trait"].name, int(proposal["value"])
        low = 1 if name == "network_max_connections" else 0
        if value < low:
            raise TraitError(f"c.MicroVMKernel.{name} must be at least {low}, not {value}")
        return value

    @validate("allow_network")
    def _check_allow_network(self, proposal: t.Any) -> list[str]:
        from .. import _core  # noqa: PLC0415 - the compiled module; only when the trait is set

        entries = list(proposal["value"])
        try:
            _core.check_allow_network(entries)
        except ValueError as e:
            raise TraitError(f"c.MicroVMKernel.allow_network: {e}") from None
        return entries

    # ---- workspace sync (issue 13; supermachine_kernel/workspace/) ----
    workspace = Enum(
        ["sync", "read-only", "off"],
        help="The kernel's working directory (the notebook's directory under Jupyter Server) "
        "as the guest REPL's cwd, /workspace: 'sync' (the host's changes go into the VM before "
        "each cell, the cell's changes come back after it), 'read-only' (host -> VM only) or "
        "'off' (the REPL starts in the image's WorkingDir or /root). Default: "
        "$SUPERMACHINE_KERNEL_WORKSPACE or 'sync'. Only with the vm backend.",
    ).tag(config=True)

    @default("workspace")
    def _workspace_default(self) -> str:
        return os.environ.get("SUPERMACHINE_KERNEL_WORKSPACE", "sync")

    workspace_max_file_bytes = Integer(
        256 * 1024 * 1024, help="Largest file the workspace sync copies (bytes); larger ones "
        "are left out and named in the cell's output.").tag(config=True)
    workspace_max_total_bytes = Integer(
        256 * 1024 * 1024, help="Most bytes the workspace sync keeps in the guest (its files "
        "live in guest RAM); files past it are left out and named.").tag(config=True)
    workspace_max_files = Integer(
        10_000, help="Most files and directories the workspace sync copies.").tag(config=True)
    workspace_exclude = List(
        Unicode(), [".ipynb_checkpoints", ".git", "__pycache__", "node_modules"],  # scan.DEFAULT_EXCLUDES
        help="File and directory names the workspace sync never copies, either way.",
    ).tag(config=True)
    workspace_exclude_hidden_dirs = Bool(
        True, help="Leave directories whose name starts with '.' (.venv, .cache, ...) out of "
        "the workspace sync.").tag(config=True)

    def workspace_limits(self) -> Limits:
        """The workspace traits as a workspace.scan.Limits."""
        from ..workspace.scan import Limits  # noqa: PLC0415 - off the kernel's start-up imports

        return Limits(max_file_bytes=self.workspace_max_file_bytes,
                      max_total_bytes=self.workspace_max_total_bytes,
                      max_files=self.workspace_max_files,
                      excludes=tuple(self.workspace_exclude),
                      exclude_hidden_dirs=self.workspace_exclude_hidden_dirs)

    def backend_options(self) -> dict:
        return dict(
            python=self.local_python,
            image=self.image,
            packages=list(self.packages),
            requirements=self.requirements or None,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            pool_min=self.pool_min,
            pool_max=self.pool_max,
            accelerator=self.accelerator,
            warmup_imports=list(self.warmup_imports),
            build_hint=self.build_command,
            guest_user=self.guest_user,
        )

    def build_command(self) -> str:
        """The command that builds this configuration's image and bakes its warm snapshot:
        `supermachine-kernel prepare --kernel NAME` when an installed kernelspec starts this
        process with these arguments, else the same with --image/--packages/--requirements."""
        name = kernelspec_of(sys.argv[1:])
        if name is not None:
            return f"supermachine-kernel prepare --kernel {name}"
        words = ["supermachine-kernel", "prepare", "--image", self.image or "default"]
        if self.packages:
            words += ["--packages", *self.packages]
        if self.requirements:
            words += ["--requirements", self.requirements]
        return shlex.join(words)

    def make_backend(self) -> t.Any:
        return make_backend(self.backend, **self.backend_options())




def kernelspec_args(argv: list[str]) -> list[str]:
    """A kernel command line's arguments without the connection file (`-f FILE`)."""
    from ..startup.hint import kernel_args  # noqa: PLC0415 - only on the not-built path

    return kernel_args(argv)


def kernelspec_of(argv: list[str]) -> str | None:
    """The installed kernelspec whose argv (after `python -m supermachine_kernel.kernel`) is
    `argv`, without the connection file; None if none is."""
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415

    mine = kernelspec_args(argv)
    try:
        specs = KernelSpecManager().get_all_specs()
    except Exception:  # noqa: BLE001 - a broken kernelspec dir: no name, the fallback command
        return None
    for name, info in sorted(specs.items()):
        spec_argv = info.get("spec", {}).get("argv") or []
        if spec_argv[1:3] == ["-m", "supermachine_kernel.kernel"] and \
                kernelspec_args(spec_argv[3:]) == mine:
            return name
    return None


def guest_config_from_argv(argv: list[str]) -> GuestConfig:
    """The guest settings a kernelspec's argv gives (`--MicroVMKernel.<trait>=...`; Jupyter's
    config files are not read): what `prepare --kernel` builds."""
    from traitlets.config import Application, Config  # noqa: PLC0415

    reader = Application()
    reader.parse_command_line([a for a in kernelspec_args(argv) if a.startswith("--")])
    section = Config()
    for name in ("GuestConfig", "MicroVMKernel"):
        if name in reader.config:
            section.merge(reader.config[name])
    return GuestConfig(config=Config({"GuestConfig": section}))
