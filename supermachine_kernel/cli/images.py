"""Guest images: a thin Python face over ``_core.ensure_image`` / ``list_images`` / ``remove_image``.

The work (recipes, Debian kernel, initramfs, erofs root image, cache) is done in Rust
(``core/runtime/src/image``); this module only gives it Python types and a place to document it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .. import _core

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


def _path(p: "Optional[str | os.PathLike[str]]") -> Optional[str]:
    return None if p is None else os.fspath(p)


def ensure_image(
    ref: Optional[str] = None,
    *,
    name: Optional[str] = None,
    cache_dir: "Optional[str | os.PathLike[str]]" = None,
    agent: "Optional[str | os.PathLike[str]]" = None,
    progress: bool = True,
    require_agent: bool = True,
    force: bool = False,
    kernel_layer: Optional[bool] = None,
    packages: Optional[Sequence[str]] = None,
    requirements: "Optional[str | os.PathLike[str]]" = None,
) -> ImagePaths:
    """Find or build image ``ref`` (None = the default recipe; a recipe name, a cached image's
    name, a root filesystem directory, or an OCI image: ``python:3.12-slim``,
    ``ghcr.io/owner/img:tag``, ``oci:DIR[:TAG]``, ``oci-archive:FILE``, ``docker-archive:FILE``).
    Blocks while building; progress goes to stderr.

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
    """Remove every cached version of image ``name``; False if there was none."""
    return _core.remove_image(name, _path(cache_dir))


def recipes() -> list:
    """Built-in recipes as (name, description), default first."""
    return list(_core.image_recipes())


def cache_dir(cache_dir: "Optional[str | os.PathLike[str]]" = None) -> str:
    """The cache root in effect."""
    return _core.image_cache_dir(_path(cache_dir))
