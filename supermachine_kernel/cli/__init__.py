"""The ``supermachine-kernel`` command line.

One argparse subcommand per concern; each is added by an ``add_*_commands(subparsers)`` function
listed in ``COMMANDS``, and sets ``func`` (called with the parsed args, returns an exit code).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Union

if TYPE_CHECKING:
    from types import ModuleType

    from ..images import CacheEntry, PruneReport
    from .progress import Bars


def _images() -> "ModuleType":
    # Imported lazily so `--help` works even before the extension module is built.
    from .. import images

    return images


def _fmt_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt_age(unix: int, now: Optional[float] = None) -> str:
    secs = max(0, (time.time() if now is None else now) - unix)
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if secs < limit:
            return f"{secs // div:.0f} {unit} ago"
    return f"{secs // 86400:.0f} days ago"


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _progress(quiet: bool, label: str = "image") -> "Union[bool, Bars]":
    """The ``progress=`` of a build: False with --quiet, else bars (TTY) or lines."""
    if quiet:
        return False
    from .progress import Bars  # noqa: PLC0415 - tqdm only when building

    return Bars(label)


def cmd_image_build(args: argparse.Namespace) -> int:
    images = _images()
    start = time.monotonic()
    bars = _progress(args.quiet, f"image {args.name}" if args.name else "image")
    try:
        p = images.ensure_image(
            args.ref,
            name=args.name,
            cache_dir=args.cache_dir,
            agent=args.agent,
            progress=bars,
            require_agent=False,
            force=args.force,
            packages=args.packages,
            requirements=args.requirements,
            kernel_layer=False if args.no_kernel_layer else None,
        )
    finally:
        if not isinstance(bars, bool):
            bars.close()
    print(f"image {p.name} ({p.hash}) ready in {time.monotonic() - start:.1f} s")
    print(f"  rootfs  {p.rootfs}")
    print(f"  kernel  {p.kernel}  ({p.kernel_release})")
    print(f"  initrd  {p.initrd or '(none: no guest agent binary found; run `make agent`)'}")
    print(f"  python  {p.python_version or '(none)'}")
    try:
        report = images.apply_budget(args.cache_dir, protect=[p.dir])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is not None and report.removed:
        print(f"cache budget (${images.BUDGET_ENV}): freed {_fmt_size(report.freed_bytes)} "
              f"({_what(report.removed)})")
    return 0


def _what(entries: "Sequence[CacheEntry]") -> str:
    """``2 images, 3 snapshots, 14 blobs``."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in counts.items()) or "nothing"


def image_rows(cache_dir: Optional[str]) -> List[dict]:
    """What `image list` shows, one dict per image version (also its --json output)."""
    images = _images()
    specs = images.kernelspec_images(cache_dir)
    snaps: dict = {}  # image directory → (count, bytes) of the warm snapshots baked on it
    running = set()
    for e in images.inventory(cache_dir):
        if e.kind == "snapshot":
            for d in e.uses:
                n, b = snaps.get(os.path.realpath(d), (0, 0))
                snaps[os.path.realpath(d)] = (n + 1, b + e.bytes)
        elif e.kind == "image" and e.in_use:
            running.add(e.path)
    rows = []
    for i in images.list_images(cache_dir):
        n, b = snaps.get(os.path.realpath(i.dir), (0, 0))
        rows.append({
            "name": i.name,
            "ref": i.reference,
            "digest": i.digest,
            "hash": i.hash,
            "size_bytes": i.size_bytes,
            "created_unix": i.created_unix,
            "last_used_unix": i.last_used_unix,
            "kernelspecs": specs.get(i.name, []),
            "snapshots": n,
            "snapshot_bytes": b,
            "in_use": i.dir in running,
            "python_version": i.python_version,
            "rootfs": i.rootfs,
        })
    return rows


def cmd_image_list(args: argparse.Namespace) -> int:
    images = _images()
    rows = image_rows(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no images in {images.cache_dir(args.cache_dir)}; build one with "
              "`supermachine-kernel image build`")
        return 0
    table = [
        [
            r["name"] + (" *" if r["in_use"] else ""),
            r["ref"],
            r["digest"][:19],
            _fmt_size(r["size_bytes"]),
            _fmt_age(r["created_unix"]),
            _fmt_age(r["last_used_unix"]),
            f"{r['snapshots']} ({_fmt_size(r['snapshot_bytes'])})" if r["snapshots"] else "-",
            ",".join(r["kernelspecs"]) or "-",
            r["python_version"] or "-",
        ]
        for r in rows
    ]
    print(_table(table, ["NAME", "REF", "DIGEST", "SIZE", "CREATED", "USED", "SNAPSHOTS",
                         "KERNELSPECS", "PYTHON"]))
    if any(r["in_use"] for r in rows):
        print("* a running VM uses it")
    return 0


def _print_report(report: "PruneReport", verb: str) -> None:
    for e in report.removed:
        print(f"{verb} {e.kind} {e.name} ({_fmt_size(e.bytes)}): {e.reason}")
    for e in report.in_use:
        print(f"kept {e.kind} {e.name}: a running VM uses it")
    for note in report.notes:
        print(f"note: {note}")
    what = "would free" if report.dry_run else "freed"
    print(f"{what} {_fmt_size(report.freed_bytes)} of {_fmt_size(report.total_bytes)} "
          f"({_what(report.removed)})")


def cmd_image_rm(args: argparse.Namespace) -> int:
    images = _images()
    known = {i.name for i in images.list_images(args.cache_dir)}
    missing = [n for n in args.names if n not in known]
    for name in missing:
        print(f"no image named {name!r} in {images.cache_dir(args.cache_dir)}", file=sys.stderr)
    present = [n for n in args.names if n in known]
    if not present:
        return 1
    report = images.prune(args.cache_dir, remove=present, policy=False, keep=[],
                          dry_run=args.dry_run)
    specs = images.kernelspec_images(args.cache_dir)
    for name in present:
        if any(e.kind == "image" and e.image == name for e in report.removed):
            print(f"{'would remove' if args.dry_run else 'removed'} image {name}")
            for spec in specs.get(name, []):
                print(f"note: kernelspec {spec} runs it; rebuild it with "
                      f"`supermachine-kernel prepare --kernel {spec}`")
    _print_report(report, "would remove" if args.dry_run else "removed")
    return 1 if missing or report.in_use else 0


def cmd_image_prune(args: argparse.Namespace) -> int:
    images = _images()
    try:
        budget = images.parse_size(args.budget) if args.budget else images.budget_from_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = images.prune(args.cache_dir, all=args.all, unused_days=args.unused_days,
                          budget=budget, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=1))
        return 0
    _print_report(report, "would remove" if args.dry_run else "removed")
    return 0


def add_image_commands(sub: "argparse._SubParsersAction") -> None:
    image = sub.add_parser("image", help="build, list, remove and prune guest images")
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache root (default: $SUPERMACHINE_CACHE_DIR or ~/.cache/supermachine-kernel)",
    )
    cache.add_argument(
        "--shared", action="store_true",
        help="the host-wide store every user's kernels restore from ($SUPERMACHINE_SHARED_CACHE_DIR, "
        "else /var/cache/supermachine-kernel): run as the admin; written readable by all")

    b = isub.add_parser(
        "build",
        parents=[cache],
        help="build (or reuse) an image",
        description="Build an image from a built-in recipe, a root filesystem directory or an "
        "OCI image, or reuse it if the cache already has it. Built-in recipes: default (Debian "
        "bookworm, python3, IPython, numpy, pandas, matplotlib, ipywidgets 8, tqdm), minimal "
        "(python3 only). With $SUPERMACHINE_CACHE_BUDGET set (e.g. 20G), the least recently "
        "used images and snapshots are then evicted until the cache fits.",
    )
    b.add_argument("ref", nargs="?", metavar="REF",
                   help="recipe name, cached image name, directory, or OCI image "
                   "(python:3.12-slim, oci:DIR[:TAG], oci-archive:FILE; default: default)")
    b.add_argument("--name", help="store the image under this name")
    b.add_argument("--packages", nargs="+", action="extend", metavar="PKG",
                   help="packages installed into a layer of an OCI image")
    b.add_argument("--requirements", metavar="FILE", help="a requirements file, likewise")
    b.add_argument("--no-kernel-layer", action="store_true",
                   help="an OCI image without the kernel layer (no python3 needed; for vm.exec "
                   "only, no kernel)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--agent", metavar="PATH", help="guest agent binary for the initramfs")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_image_build)

    ls = isub.add_parser(
        "list", aliases=["ls"], parents=[cache], help="list cached images",
        description="Every cached image version: what it was built from (REF: OCI reference, "
        "recipe or directory), its DIGEST (the OCI manifest digest; recipe:<hash> otherwise), "
        "disk SIZE, when it was CREATED and last USED, its warm SNAPSHOTS and the installed "
        "KERNELSPECS that run it.")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_image_list)

    rm = isub.add_parser(
        "rm", parents=[cache], help="remove cached images and their warm snapshots",
        description="Remove every version of each image, its warm snapshots and launch hints, "
        "and the OCI blobs and package layers only it used. What a running VM uses stays.")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--dry-run", action="store_true", help="only say what would go")
    rm.set_defaults(func=cmd_image_rm)

    pr = isub.add_parser(
        "prune", parents=[cache], help="remove what nothing uses",
        description="Remove stale warm snapshots (their image is gone or changed, or they were "
        "baked for another QEMU, runtime or agent), older image versions unused for a day, OCI "
        "blobs and package layers no image uses, leftovers of interrupted builds and old launch "
        "hints. Images an installed kernelspec runs stay, and nothing a running VM uses is "
        "removed.")
    pr.add_argument("--all", action="store_true",
                    help="also remove every image no installed kernelspec runs")
    pr.add_argument("--unused-days", type=float, metavar="N",
                    help="also remove images (no kernelspec runs) and snapshots unused for N days")
    pr.add_argument("--budget", metavar="SIZE",
                    help="then evict least recently used images and snapshots until the cache "
                    "fits SIZE (e.g. 20G, 500M; default: $SUPERMACHINE_CACHE_BUDGET)")
    pr.add_argument("--dry-run", action="store_true", help="only list what would go")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")
    pr.set_defaults(func=cmd_image_prune)


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
        if getattr(args, "shared", False):
            if getattr(args, "cache_dir", None):
                print("error: give --shared or --cache-dir, not both", file=sys.stderr)
                return 2
            path = _images().use_shared_store()
            if hasattr(args, "cache_dir"):
                args.cache_dir = path
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - typed errors below, everything else re-raised
        from .. import _core  # noqa: PLC0415 - absent until the extension is built (--help works)

        if isinstance(e, (_core.ImageError,)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
