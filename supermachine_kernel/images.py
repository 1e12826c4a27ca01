"""Guest images: a thin Python face over ``_core.ensure_image`` / ``list_images`` / ``remove_image``
and the cache housekeeping (``cache_inventory`` / ``prune_cache``), plus what only the Python
side knows: which installed kernelspecs use which image, and the cache budget setting.

The work (recipes, Debian kernel, initramfs, erofs root image, cache, pruning) is done in Rust
(``core/runtime/src/image``); this module only gives it Python types and a place to document it.
Progress bars for builds live in ``cli/progress.py``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import _core
from .api import DEFAULT_SHARED_CACHE_DIR, SHARED_CACHE_ENV

ImageError = _core.ImageError


@dataclass(frozen=True)
class ImagePaths:
    """Everything needed to boot one image."""

    name: str
    hash: str
    kernel: str
    initrd: Optional[str]
    rootfs: str
    python_version: Optional[str]
    kernel_release: str
    modules: tuple
    dir: str
    #: For an image built from an OCI source: reference, digests, layers and its config
    #: (env, working_dir, user, entrypoint, cmd); with package layers also ``pip_layers``
    #: ([{kind, key, pins}]) and ``guest`` ({python, version, platforms, site, installed}).
    oci: Optional[dict] = None


@dataclass(frozen=True)
class CachedImage:
    """One image in the cache, as ``supermachine-kernel image list`` shows it."""

    name: str
    hash: str
    source: str
    rootfs: str
    dir: str
    size_bytes: int
    created_unix: int
    python_version: Optional[str]
    kernel: Optional[str]
    #: What it was built from: the OCI reference, the recipe's name or the directory.
    reference: str = ""
    #: The OCI manifest digest (``sha256:...``); ``recipe:<hash>`` for other images.
    digest: str = ""
    last_used_unix: int = 0


def _path(p: "Optional[str | os.PathLike[str]]") -> Optional[str]:
    return None if p is None else os.fspath(p)


def ensure_image(
    ref: Optional[str] = None,
    *,
    name: Optional[str] = None,
    cache_dir: "Optional[str | os.PathLike[str]]" = None,
    agent: "Optional[str | os.PathLike[str]]" = None,
    progress: Union[bool, Callable[[dict], Any]] = True,
    require_agent: bool = True,
    force: bool = False,
    kernel_layer: Optional[bool] = None,
    packages: Optional[Sequence[str]] = None,
    requirements: "Optional[str | os.PathLike[str]]" = None,
) -> ImagePaths:
    """Find or build image ``ref`` (None = the default recipe; a recipe name, a cached image's
    name, a root filesystem directory, or an OCI image: ``python:3.12-slim``,
    ``ghcr.io/owner/img:tag``, ``oci:DIR[:TAG]``, ``oci-archive:FILE``, ``docker-archive:FILE``).
    Blocks while building; progress goes to stderr, or to ``progress`` when it is a callable
    (given each event as a dict; ``cli.progress.Bars`` draws them).

    An OCI image gets the kernel layer (what the guest REPL needs, for the guest's own Python
    and libc) unless ``kernel_layer=False``; ``packages``/``requirements`` add a layer of the
    user's packages. Both are installed by the host's pip and cached by their resolved sets."""
    d = _core.ensure_image(
        ref, name, _path(cache_dir), _path(agent), progress, require_agent, force,
        kernel_layer=kernel_layer,
        packages=None if packages is None else list(packages),
        requirements=_path(requirements),
    )
    d["modules"] = tuple(d["modules"])
    return ImagePaths(**d)


def list_images(cache_dir: "Optional[str | os.PathLike[str]]" = None) -> list:
    """Every cached image, by name, newest first."""
    return [CachedImage(**d) for d in _core.list_images(_path(cache_dir))]


def remove_image(name: str, cache_dir: "Optional[str | os.PathLike[str]]" = None) -> bool:
    """Remove every cached version of image ``name`` and its warm snapshots; False if there was
    none."""
    return _core.remove_image(name, _path(cache_dir))


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache (see ``core/runtime/src/image/housekeeping.rs``)."""

    kind: str  # image | snapshot | hint | blob | layer | resolve | kernel | initrd | leftover
    name: str
    path: str
    bytes: int
    created_unix: int
    last_used_unix: int
    in_use: bool
    image: Optional[str]
    reason: str = ""
    #: Paths of what it uses (a snapshot: its image's, kernel's and initramfs' directories).
    uses: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class PruneReport:
    removed: List[CacheEntry]
    #: Entries that would have gone but a running VM uses.
    in_use: List[CacheEntry]
    total_bytes: int
    freed_bytes: int
    dry_run: bool
    notes: List[str] = field(default_factory=list)


def inventory(cache_dir: "Optional[str | os.PathLike[str]]" = None) -> List[CacheEntry]:
    """Everything in the cache, with sizes, ages and whether a running VM uses it."""
    return [CacheEntry(**d) for d in _core.cache_inventory(_path(cache_dir))]


def prune(
    cache_dir: "Optional[str | os.PathLike[str]]" = None,
    *,
    remove: Sequence[str] = (),
    policy: bool = True,
    all: bool = False,
    unused_days: Optional[float] = None,
    budget: Optional[int] = None,
    dry_run: bool = False,
    keep: Optional[Sequence[str]] = None,
    protect: Sequence["str | os.PathLike[str]"] = (),
) -> PruneReport:
    """Removes from the cache what nothing uses (see ``supermachine-kernel image prune --help``);
    ``remove``: these images, with their warm snapshots. Images an installed kernelspec uses
    (``keep``; default: found with ``kernelspec_images``) stay, and so does everything a running
    VM uses, and the image or snapshot directories in ``protect``."""
    if keep is None:
        keep = list(kernelspec_images(cache_dir))
    d = _core.prune_cache(_path(cache_dir), keep=list(keep), remove=list(remove), policy=policy,
                          all=all, unused_days=unused_days, budget=budget, dry_run=dry_run,
                          protect=[os.fspath(p) for p in protect])
    return PruneReport(
        removed=[CacheEntry(**e) for e in d["removed"]],
        in_use=[CacheEntry(**e) for e in d["in_use"]],
        total_bytes=d["total_bytes"],
        freed_bytes=d["freed_bytes"],
        dry_run=d["dry_run"],
        notes=list(d["notes"]),
    )


def image_name_for(ref: Optional[str], cache_dir: "Optional[str | os.PathLike[str]]" = None,
                   packages: Sequence[str] = (), requirements: Optional[str] = None
                   ) -> Optional[str]:
    """The cache name image reference ``ref`` builds to (None: the default image) with
    ``packages`` and ``requirements``: an OCI image with packages is named after them too
    (``python-3.12-slim-<hash>``), so environments on one base image do not evict each other."""
    return _core.image_name_for(ref, _path(cache_dir), list(packages) or None, requirements or None)


_IMAGE_ARG = "--MicroVMKernel.image"
_PACKAGES_ARG = "--MicroVMKernel.packages="
_REQUIREMENTS_ARG = "--MicroVMKernel.requirements="


def kernelspec_image_ref(argv: Sequence[str]) -> Optional[str]:
    """The image reference a kernelspec's argv runs (``--MicroVMKernel.image=REF``, else the
    default image), or None if the argv does not start this kernel."""
    if not any("supermachine_kernel" in a for a in argv):
        return None
    ref = "default"
    for i, a in enumerate(argv):
        if a.startswith(_IMAGE_ARG + "="):
            ref = a.split("=", 1)[1]
        elif a == _IMAGE_ARG and i + 1 < len(argv):
            ref = argv[i + 1]
    return ref


def kernelspec_packages(argv: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """The packages and requirements file a kernelspec's argv installs (as ``install`` writes
    them: ``--MicroVMKernel.packages=PKG`` once per package, ``--MicroVMKernel.requirements=F``)."""
    packages = [a[len(_PACKAGES_ARG):] for a in argv if a.startswith(_PACKAGES_ARG)]
    requirements = None
    for a in argv:
        if a.startswith(_REQUIREMENTS_ARG):
            requirements = a[len(_REQUIREMENTS_ARG):] or None
    return packages, requirements


def kernelspec_images(cache_dir: "Optional[str | os.PathLike[str]]" = None
                      ) -> Dict[str, List[str]]:
    """Image name → the installed kernelspecs (``jupyter kernelspec list``) that run it."""
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415 - slow import

    out: Dict[str, List[str]] = {}
    for spec_name, info in sorted(KernelSpecManager().get_all_specs().items()):
        argv = (info.get("spec") or {}).get("argv") or []
        ref = kernelspec_image_ref([str(a) for a in argv])
        if ref is None:
            continue
        packages, requirements = kernelspec_packages([str(a) for a in argv])
        name = image_name_for(None if ref in ("", "default") else ref, cache_dir, packages,
                              requirements) or ref
        out.setdefault(name, []).append(spec_name)
    return out


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_size(text: str) -> int:
    """``20G``, ``500MB``, ``1.5GiB``, ``800000`` → bytes (K/M/G/T: powers of 1000; KiB/MiB/
    GiB/TiB: of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 20G, 500M, 1.5GiB or a byte count)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


BUDGET_ENV = "SUPERMACHINE_CACHE_BUDGET"


def budget_from_env() -> Optional[int]:
    """The cache budget ``$SUPERMACHINE_CACHE_BUDGET`` sets (None when unset or empty)."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"{BUDGET_ENV}: {e}") from None


def apply_budget(cache_dir: "Optional[str | os.PathLike[str]]" = None,
                 protect: Sequence["str | os.PathLike[str]"] = ()) -> Optional[PruneReport]:
    """After a build: evicts least recently used images and snapshots until the cache fits
    ``$SUPERMACHINE_CACHE_BUDGET`` (None when no budget is set), never what the build just made
    (``protect``: its image or snapshot directory). Only the budget applies here, not the other
    prune rules."""
    budget = budget_from_env()
    if budget is None:
        return None
    return prune(cache_dir, policy=False, budget=budget, protect=protect)


def recipes() -> list:
    """Built-in recipes as (name, description), default first."""
    return list(_core.image_recipes())


def cache_dir(cache_dir: "Optional[str | os.PathLike[str]]" = None) -> str:
    """The cache root in effect."""
    return _core.image_cache_dir(_path(cache_dir))


def use_shared_store() -> str:
    """Points this process, and the kernels it starts, at the host-wide store
    (``$SUPERMACHINE_SHARED_CACHE_DIR``, else /var/cache/supermachine-kernel) as its cache, for
    an admin building images and warm snapshots every user of the host restores: the store is
    created 0755 and everything written from now on is readable by all (umask 022), writable
    by its owner only. Returns the store's path."""
    path = os.environ.get(SHARED_CACHE_ENV, "").strip() or DEFAULT_SHARED_CACHE_DIR
    os.makedirs(path, mode=0o755, exist_ok=True)
    if os.stat(path).st_uid == os.geteuid():  # a user listing the admin's store changes nothing
        os.chmod(path, 0o755)
    os.umask(0o022)
    os.environ["SUPERMACHINE_CACHE_DIR"] = path
    return path
