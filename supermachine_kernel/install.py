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
_REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "kernelspecs" / KERNEL_NAME


# Used when the package is installed without the source tree; keep equal to the template file.
_DEFAULT_SPEC = {
    "argv": ["python3", "-m", "supermachine_kernel.kernel", "-f", "{connection_file}"],
    "display_name": "Python (microVM)",
    "language": "python",
    "interrupt_mode": "message",
    "metadata": {"debugger": False},
}


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
        for extra in ("logo-32x32.png", "logo-64x64.png"):
            src = _REPO_TEMPLATE / extra
            if src.is_file():
                shutil.copy(src, tmp)
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


def add_install_commands(sub: "argparse._SubParsersAction") -> None:
    """`supermachine-kernel install` (hooked into cli.COMMANDS)."""
    ap = sub.add_parser("install", help='install the "Python (microVM)" kernelspec',
                        description='Install the "Python (microVM)" Jupyter kernelspec.')
    _add_arguments(ap)
    ap.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m supermachine_kernel.install",
        description='Install the "Python (microVM)" Jupyter kernelspec.',
    )
    _add_arguments(ap)
    return _run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
