"""The OCI image tests/image/test_layers.py and bench/images.py build on: Debian bookworm with
python3 and python3-six only, one layer, written as an OCI layout directory and cached under the
image cache's ``test/`` (built once with mmdebstrap, ~20 s; later runs find it). Six 1.16.0 from
Debian is the version package layers must not override.

Standard library only: bench/images.py loads this file by its path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

LAYOUT_VERSION = "1"  # bump to rebuild the cached layout
LAYOUT_NAME = f"oci-debian-python3-v{LAYOUT_VERSION}"
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "SMK_FROM_IMAGE=yes"]


class CannotBuild(RuntimeError):
    """This host cannot build the layout (no mmdebstrap, or not root); the message says what
    to do."""


def write_layout(layout: Path, layer_tar: Path, env: list[str]) -> None:
    """An OCI layout at ``layout`` (created) with one image, tag ``v1``: the single layer
    ``layer_tar`` (moved into the layout) and a config with ``env`` and WorkingDir /root."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    h = hashlib.sha256()
    with open(layer_tar, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    layer_digest = h.hexdigest()
    size = layer_tar.stat().st_size
    layer_tar.rename(blobs / layer_digest)

    def blob(data: bytes, media_type: str) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{d}", "size": len(data)}

    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env, "WorkingDir": "/root"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }
    cfg = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                           "digest": f"sha256:{layer_digest}", "size": size}]}
    m = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    m["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [m]}))


def debian_python_layout(cache_dir: str | os.PathLike[str],
                         note: Callable[[str], None] | None = None) -> Path:
    """The layout (``oci:<it>:v1``) under ``<cache_dir>/test/``, built first if absent (``note``
    is told so); raises CannotBuild when it is absent and this host cannot build it."""
    final = Path(cache_dir) / "test" / LAYOUT_NAME
    if (final / "index.json").is_file():
        return final
    if shutil.which("mmdebstrap") is None or os.geteuid() != 0:
        raise CannotBuild("building the Debian python3 test layout needs root and mmdebstrap "
                          "(apt-get install mmdebstrap, or tools/setup-host.sh)")
    if note is not None:
        note("building the Debian python3 layout (mmdebstrap) ...")
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tar = tmp / "root.tar"
    subprocess.run(
        ["mmdebstrap", "--mode=root", "--variant=apt", "--include=python3,python3-six",
         "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
         "--dpkgopt=path-exclude=/usr/share/locale/*", "--quiet", "bookworm", str(tar)],
        check=True, capture_output=True,
    )
    write_layout(tmp / "layout", tar, ENV)
    (tmp / "layout").rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
