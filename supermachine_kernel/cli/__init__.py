"""The ``supermachine-kernel`` command line.

One argparse subcommand per concern; each is added by an ``add_*_commands(subparsers)`` function
listed in ``COMMANDS``, and sets ``func`` (called with the parsed args, returns an exit code).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Optional


def _images():
    # Imported lazily so `--help` works even before the extension module is built.
    from . import images

    return images


def _fmt_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def cmd_image_build(args: argparse.Namespace) -> int:
    images = _images()
    start = time.monotonic()
    p = images.ensure_image(
        args.ref,
        name=args.name,
        cache_dir=args.cache_dir,
        agent=args.agent,
        progress=not args.quiet,
        require_agent=False,
        force=args.force,
    )
    print(f"image {p.name} ({p.hash}) ready in {time.monotonic() - start:.1f} s")
    print(f"  rootfs  {p.rootfs}")
    print(f"  kernel  {p.kernel}  ({p.kernel_release})")
    print(f"  initrd  {p.initrd or '(none: no guest agent binary found; run `make agent`)'}")
    print(f"  python  {p.python_version or '(none)'}")
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    images = _images()
    rows = [
        [
            i.name,
            i.hash,
            _fmt_size(i.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_unix)),
            i.python_version or "-",
            i.rootfs,
        ]
        for i in images.list_images(args.cache_dir)
    ]
    if not rows:
        print(f"no images in {images.cache_dir(args.cache_dir)}; build one with "
              "`supermachine-kernel image build`")
        return 0
    print(_table(rows, ["NAME", "HASH", "SIZE", "CREATED", "PYTHON", "PATH"]))
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    images = _images()
    status = 0
    for name in args.names:
        if images.remove_image(name, args.cache_dir):
            print(f"removed image {name}")
        else:
            print(f"no image named {name!r} in {images.cache_dir(args.cache_dir)}",
                  file=sys.stderr)
            status = 1
    return status


def add_image_commands(sub: "argparse._SubParsersAction") -> None:
    image = sub.add_parser("image", help="build, list and remove guest images")
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache root (default: $SUPERMACHINE_CACHE_DIR or ~/.cache/supermachine-kernel)",
    )

    b = isub.add_parser(
        "build",
        parents=[cache],
        help="build (or reuse) an image",
        description="Build an image from a built-in recipe or a root filesystem directory, or "
        "reuse it if the cache already has it. Built-in recipes: default (Debian bookworm, "
        "python3, IPython, numpy, pandas, matplotlib, ipywidgets 8, tqdm), minimal (python3 only).",
    )
    b.add_argument("ref", nargs="?", metavar="NAME_OR_PATH",
                   help="recipe name, cached image name, or directory (default: default)")
    b.add_argument("--name", help="store the image under this name")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--agent", metavar="PATH", help="guest agent binary for the initramfs")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=cmd_image_build)

    ls = isub.add_parser("list", aliases=["ls"], parents=[cache], help="list cached images")
    ls.set_defaults(func=cmd_image_list)

    rm = isub.add_parser("rm", parents=[cache], help="remove cached images")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_image_rm)


from .install import add_install_commands  # noqa: E402 - kernelspec installation (kernel owner)

#: Adders of top-level subcommands; append yours.
COMMANDS: List[Callable[["argparse._SubParsersAction"], None]] = [
    add_image_commands,
    add_install_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supermachine-kernel",
        description="A Jupyter kernel that runs every notebook in its own microVM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - typed errors below, everything else re-raised
        from .. import _core

        if isinstance(e, (_core.ImageError,)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
