"""Installs kernelspecs (`python -m supermachine_kernel install ...`) and prepares them
(`supermachine-kernel prepare --kernel NAME`).

The template is `kernelspecs/python-microvm/kernel.json`; its argv[0] is replaced by the Python
that runs this installer, so the kernel starts in the environment that has the runtime.

One kernelspec per environment: `install --name py312-sklearn --image python:3.12-slim
--packages scikit-learn` writes the environment into the kernelspec's argv, which is what the
kernel reads:

    "argv": [PYTHON, "-m", "supermachine_kernel.kernel", "-f", "{connection_file}",
             "--MicroVMKernel.image=python:3.12-slim",
             "--MicroVMKernel.packages=scikit-learn",        (once per package)
             "--MicroVMKernel.requirements=/abs/requirements.txt"],
    "metadata": {..., "supermachine": {"image": "python:3.12-slim",
                                       "packages": ["scikit-learn"],
                                       "requirements": "/abs/requirements.txt"}}

(`metadata.supermachine` repeats the argv for tools that list environments; only kernelspecs
with an environment have it.) Each such kernelspec has its own warm snapshot (keyed by the
image and packages) and launch hint (keyed by the argv). The kernel never pulls or installs
at start: `prepare --kernel NAME` builds the image and bakes the snapshot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import tempfile
import typing as t
from pathlib import Path

from ..kernel.config import GuestConfig, guest_config_from_argv

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
    image: str | None = None,
    packages: list[str] | None = None,
    requirements: str | None = None,
) -> dict:
    spec = template()
    spec["argv"][0] = python or sys.executable
    if backend:
        spec["argv"].append(f"--MicroVMKernel.backend={backend}")
    env = environment_args(image, packages, requirements)
    spec["argv"].extend(env)
    if env:
        requirements = os.path.abspath(requirements) if requirements else None
        spec["metadata"]["supermachine"] = {"image": image or "default",
                                            "packages": list(packages or []),
                                            "requirements": requirements}
    spec["argv"].extend(extra_args or [])
    if display_name:
        spec["display_name"] = display_name
    if interrupt_mode:
        if interrupt_mode not in ("signal", "message"):
            raise ValueError("interrupt_mode must be 'signal' or 'message'")
        spec["interrupt_mode"] = interrupt_mode
    return spec


def environment_args(image: str | None, packages: list[str] | None,
                     requirements: str | None) -> list[str]:
    """The kernel arguments that select an environment (image, packages, requirements file)."""
    args = [f"--MicroVMKernel.image={image}"] if image else []
    for p in packages or []:
        if not p.strip() or p.startswith("-"):
            raise ValueError(f"not a package requirement: {p!r}")
        args.append(f"--MicroVMKernel.packages={p}")
    if requirements:
        if not os.path.isfile(requirements):
            raise ValueError(f"requirements file {requirements} does not exist")
        args.append(f"--MicroVMKernel.requirements={os.path.abspath(requirements)}")
    return args


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    kernel_name: str = KERNEL_NAME,
    **spec_options: t.Any,
) -> str:
    """Writes the kernelspec and returns the directory it was installed to."""
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415 - slow import

    spec = kernel_json(**spec_options)
    with tempfile.TemporaryDirectory() as tmp:
        # jupyter_client copies the folder's mode too: mkdtemp's 0700 would hide a --sys-prefix
        # or system kernelspec from every other user (JupyterHub users among them).
        os.chmod(tmp, 0o755)
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
    ap.add_argument("--name", help=f"kernelspec name (default {KERNEL_NAME}; required with "
                    "--image/--packages/--requirements)")
    ap.add_argument("--display-name", help='display name (default "Python (microVM)", or one '
                    "naming the environment)")
    env = ap.add_argument_group("environment (the guest image the kernelspec runs)")
    env.add_argument("--image", metavar="REF",
                     help="guest image: an OCI image (python:3.12-slim, oci:DIR:TAG, ...; it "
                     "gets the kernel layer) or a cached image's name (default: the built-in)")
    env.add_argument("--packages", nargs="+", action="extend", metavar="PKG",
                     help="packages installed into a layer of the image (e.g. scikit-learn)")
    env.add_argument("--requirements", metavar="FILE", help="a requirements file, likewise")
    ap.add_argument("--backend", choices=("vm", "local"),
                    help="pin the backend (local = host subprocess, NOT isolated)")
    ap.add_argument("--interrupt-mode", choices=("signal", "message"))


def _environment_display_name(image: str | None, packages: list[str] | None) -> str:
    what = ", ".join([image or "default image", *(packages or [])])
    return f"Python (microVM: {what})"


def _run(args: argparse.Namespace) -> int:
    prefix = sys.prefix if args.sys_prefix else args.prefix
    has_env = bool(args.image or args.packages or args.requirements)
    name = args.name or KERNEL_NAME
    if has_env and name == KERNEL_NAME:
        print(f"error: give the environment's kernelspec a name of its own (--name, e.g. "
              f"--name py312-sklearn); {KERNEL_NAME} is the built-in image's", file=sys.stderr)
        return 2
    try:
        dest = install(
            user=args.user,
            prefix=prefix,
            kernel_name=name,
            backend=args.backend,
            display_name=args.display_name or (
                _environment_display_name(args.image, args.packages) if has_env else None),
            interrupt_mode=args.interrupt_mode,
            image=args.image,
            packages=args.packages,
            requirements=args.requirements,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Installed kernelspec {name} in {dest}")
    if has_env:
        print(f"Build its image and warm snapshot now (else the kernel refuses to start): "
              f"supermachine-kernel prepare --kernel {name}")
    return 0


def build_image(config: GuestConfig, progress: t.Any = True) -> t.Any:
    """Finds or builds the image a kernel configuration runs on, with its kernel layer and
    packages (pulls and pip installs as needed; the kernel itself only looks it up)."""
    from .. import api  # noqa: PLC0415 - needs the compiled runtime

    return api.Image.build(
        ref=None if config.image in ("", "default") else config.image,
        packages=list(config.packages) or None,
        requirements=config.requirements or None,
        snapshot=False,
        progress=progress,
    )


def prepare(kernel_name: str = KERNEL_NAME, timeout: float = 1800) -> float:
    """Builds the kernelspec's image (with its packages), then starts the installed kernel once
    and runs a cell, so the kernel's warm snapshot is baked now rather than on a user's first
    kernel start. Returns the seconds it took. Uses the real kernelspec and Jupyter config, so
    it bakes exactly what users get."""
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415 - slow import
    from jupyter_client.manager import KernelManager  # noqa: PLC0415

    t0 = time.monotonic()
    config = guest_config_from_argv(KernelSpecManager().get_kernel_spec(kernel_name).argv[1:])
    from .progress import Bars, spinner  # noqa: PLC0415 - tqdm only when preparing

    if config.backend == "vm":
        with Bars(f"image {config.image}") as bars:
            build_image(config, progress=bars)
    with spinner(f"kernel {kernel_name}: first start and warm snapshot"):
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
                raise RuntimeError(
                    f"the kernel could not run a cell: {c.get('ename')}: {c.get('evalue')}")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    return time.monotonic() - t0


def _run_prepare(args: argparse.Namespace) -> int:
    if args.image or args.packages or args.requirements:
        if args.kernel is not None:
            print("error: give --kernel NAME or --image/--packages/--requirements, not both",
                  file=sys.stderr)
            return 2
        config = GuestConfig(image=args.image or "default", packages=args.packages or [],
                             requirements=args.requirements or "")
        from .progress import Bars  # noqa: PLC0415 - tqdm only when preparing

        with Bars(f"image {config.image}") as bars:
            image = build_image(config, progress=bars)
        print(f"image {image.name} ({image.hash}) ready, python {image.python_version or '-'}; "
              "its kernels bake their warm snapshot at their first start")
        return 0
    kernel = args.kernel or KERNEL_NAME
    print(f"preparing kernel {kernel}: image and warm snapshot (minutes the first time)...",
          flush=True)
    seconds = prepare(kernel, args.timeout)
    print(f"kernel {kernel} ready ({seconds:.1f} s); later starts restore the snapshot")
    return 0


def add_install_commands(sub: "argparse._SubParsersAction") -> None:
    """`supermachine-kernel install` and `prepare` (hooked into cli.COMMANDS)."""
    ap = sub.add_parser("install", help='install the "Python (microVM)" kernelspec',
                        description='Install the "Python (microVM)" Jupyter kernelspec.')
    _add_arguments(ap)
    ap.set_defaults(func=_run)
    pp = sub.add_parser("prepare", help="build a kernel's image and bake its warm VM snapshot now",
                        description="Build the kernelspec's image (pull, kernel layer, packages) "
                        "and start the installed kernel once, so its warm snapshot (Python "
                        "started, warmup modules imported) is baked now instead of on the first "
                        "notebook start. With --image/--packages instead of --kernel: build that "
                        "image only.")
    pp.add_argument("--kernel", help=f"kernelspec name (default {KERNEL_NAME})")
    pp.add_argument("--image", metavar="REF", help="build this image instead (see install)")
    pp.add_argument("--packages", nargs="+", action="extend", metavar="PKG",
                    help="with --image: its package layer")
    pp.add_argument("--requirements", metavar="FILE", help="with --image: a requirements file")
    pp.add_argument("--timeout", type=float, default=1800, help="seconds (default %(default)s)")
    pp.add_argument("--shared", action="store_true",
                    help="into the host-wide store every user's kernels restore from "
                    "($SUPERMACHINE_SHARED_CACHE_DIR, else /var/cache/supermachine-kernel): run "
                    "as the admin, with the kernelspec and Jupyter configuration users get")
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
