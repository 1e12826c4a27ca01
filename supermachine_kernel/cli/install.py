"""Installs the "Python (microVM)" kernelspec (`python -m supermachine_kernel install ...`).

The template is `kernelspecs/python-microvm/kernel.json`; its argv[0] is replaced by the Python
that runs this installer, so the kernel starts in the environment that has the runtime.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "python-microvm"
_REPO_TEMPLATE = Path(__file__).resolve().parents[2] / "kernelspecs" / KERNEL_NAME


# Used when the package is installed without the source tree; keep equal to the template file.
_DEFAULT_SPEC = {
    "argv": ["python3", "-m", "supermachine_kernel.kernel", "-f", "{connection_file}"],
    "display_name": "Python (microVM)",
    "language": "python",
    "interrupt_mode": "message",
    # CurveZMQ: jupyter_client provisions keys for kernels that declare it (with its
    # transport_encryption policy "auto" or "required"); the kernel encrypts all its sockets then.
    "metadata": {"debugger": False, "supported_encryption": ["curve"]},
}
# The launcher icons; kernelspecs/python-microvm links to them.
_LOGOS = Path(__file__).resolve().parents[1] / "logos"
LOGO_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


def template() -> dict:
    """The kernel.json template from `kernelspecs/` (or its built-in copy outside a checkout)."""
    path = _REPO_TEMPLATE / "kernel.json"
    if path.is_file():
        return json.loads(path.read_text())
    return json.loads(json.dumps(_DEFAULT_SPEC))


def kernel_json(
    *,
    python: str | None = None,
    backend: str | None = None,
    display_name: str | None = None,
    interrupt_mode: str | None = None,
    extra_args: list[str] | None = None,
) -> dict:
    spec = template()
    spec["argv"][0] = python or sys.executable
    if backend:
        spec["argv"].append(f"--MicroVMKernel.backend={backend}")
    spec["argv"].extend(extra_args or [])
    if display_name:
        spec["display_name"] = display_name
    if interrupt_mode:
        if interrupt_mode not in ("signal", "message"):
            raise ValueError("interrupt_mode must be 'signal' or 'message'")
        spec["interrupt_mode"] = interrupt_mode
    return spec


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    kernel_name: str = KERNEL_NAME,
    **spec_options,
) -> str:
    """Writes the kernelspec and returns the directory it was installed to."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = kernel_json(**spec_options)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        for logo in LOGO_FILES:
            shutil.copy(_LOGOS / logo, tmp)
        return KernelSpecManager().install_kernel_spec(
            tmp, kernel_name=kernel_name, user=user, prefix=prefix
        )


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels")
    ap.add_argument("--name", default=KERNEL_NAME, help="kernelspec name (default %(default)s)")
    ap.add_argument("--display-name", help='display name (default "Python (microVM)")')
    ap.add_argument("--backend", choices=("vm", "local"),
                    help="pin the backend (local = host subprocess, NOT isolated)")
    ap.add_argument("--interrupt-mode", choices=("signal", "message"))


def _run(args: argparse.Namespace) -> int:
    prefix = sys.prefix if args.sys_prefix else args.prefix
    dest = install(
        user=args.user,
        prefix=prefix,
        kernel_name=args.name,
        backend=args.backend,
        display_name=args.display_name,
        interrupt_mode=args.interrupt_mode,
    )
    print(f"Installed kernelspec {args.name} in {dest}")
    return 0


def prepare(kernel_name: str = KERNEL_NAME, timeout: float = 1800) -> float:
    """Starts the installed kernel once and runs a cell, so the image is built and the kernel's
    warm snapshot baked now rather than on a user's first kernel start. Returns the seconds it
    took. Uses the real kernelspec and Jupyter config, so it bakes exactly what users get."""
    import time

    from jupyter_client.manager import KernelManager

    t0 = time.monotonic()
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
        reply = kc.execute_interactive("import sys; sys.version_info[:2]", timeout=timeout,
                                       output_hook=lambda msg: None)
        if reply["content"]["status"] != "ok":
            c = reply["content"]
            raise RuntimeError(f"the kernel could not run a cell: {c.get('ename')}: {c.get('evalue')}")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return time.monotonic() - t0


def _run_prepare(args: argparse.Namespace) -> int:
    print(f"preparing kernel {args.kernel}: image and warm snapshot (minutes the first time)...",
          flush=True)
    seconds = prepare(args.kernel, args.timeout)
    print(f"kernel {args.kernel} ready ({seconds:.1f} s); later starts restore the snapshot")
    return 0


def add_install_commands(sub: "argparse._SubParsersAction") -> None:
    """`supermachine-kernel install` and `prepare` (hooked into cli.COMMANDS)."""
    ap = sub.add_parser("install", help='install the "Python (microVM)" kernelspec',
                        description='Install the "Python (microVM)" Jupyter kernelspec.')
    _add_arguments(ap)
    ap.set_defaults(func=_run)
    pp = sub.add_parser("prepare", help="bake the kernel's warm VM snapshot now",
                        description="Start the installed kernel once, so its image is built and "
                        "its warm snapshot (Python started, warmup modules imported) baked now "
                        "instead of on the first notebook start.")
    pp.add_argument("--kernel", default=KERNEL_NAME, help="kernelspec name (default %(default)s)")
    pp.add_argument("--timeout", type=float, default=1800, help="seconds (default %(default)s)")
    pp.set_defaults(func=_run_prepare)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m supermachine_kernel.cli.install",
        description='Install the "Python (microVM)" Jupyter kernelspec.',
    )
    _add_arguments(ap)
    return _run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
