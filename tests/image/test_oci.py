"""An OCI image as a guest root: ``Image.build(ref="oci:DIR:TAG")`` on a layout this test
writes (a static busybox, two layers with a whiteout), then a cold boot and an exec in it.

The registry side (pull, auth, TLS, digests, hostile layers) is covered by the Rust tests in
core/runtime/tests/oci_*.rs; this checks that such an image boots with our kernel, initrd
and agent.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from supermachine_kernel import api
from supermachine_kernel import images
from supermachine_kernel.api import _core

BUSYBOX = shutil.which("busybox")
NAME = "test-oci-busybox"


def _layer(entries: list[tuple[str, bytes | None, int, str | None]]) -> bytes:
    """A tar layer: (path, data or None for a directory, mode, symlink target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data, mode, link in entries:
            info = tarfile.TarInfo(path)
            info.mode = mode
            info.mtime = 1_600_000_000
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(layout: Path, data: bytes, media_type: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, greeting: bytes = b"from layer 2\n") -> Path:
    """Writes the image; returns the path of its top layer's blob."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    assert BUSYBOX is not None
    base = _layer([
        ("bin", None, 0o755, None),
        ("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755, None),
        ("bin/sh", None, 0o777, "busybox"),
        ("etc", None, 0o755, None),
        ("etc/greeting", b"from layer 1\n", 0o644, None),
        ("etc/removed", b"x", 0o644, None),
    ])
    top = _layer([
        ("etc/greeting", greeting, 0o644, None),
        ("etc/.wh.removed", b"", 0o644, None),
    ])
    layers = [_blob(layout, base, "application/vnd.oci.image.layer.v1.tar"),
              _blob(layout, top, "application/vnd.oci.image.layer.v1.tar")]
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/etc"},
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{hashlib.sha256(b).hexdigest()}" for b in (base, top)]},
    }
    cfg = _blob(layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": layers}
    m = _blob(layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    m["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [m]}))
    return layout / "blobs" / "sha256" / layers[1]["digest"].removeprefix("sha256:")


@pytest.fixture(scope="module")
def oci_image(tmp_path_factory):
    if BUSYBOX is None:
        pytest.fail("busybox is missing: install busybox-static (tools/setup-host.sh does)")
    layout = tmp_path_factory.mktemp("oci") / "layout"
    write_layout(layout)
    img = api.Image.build(ref=f"oci:{layout}:v1", name=NAME, snapshot=False, progress=False,
                          kernel_layer=False)
    yield img
    _core.remove_image(NAME, None)


def test_oci_layout_image_boots_and_runs(oci_image):
    assert oci_image.name == NAME
    assert any(i["name"] == NAME and i["source"].startswith("oci:") for i in _core.list_images(None))
    vm = oci_image.boot()
    try:
        r = vm.exec(["/bin/busybox", "cat", "/etc/greeting"])
        assert (r.exit_code, r.stdout) == (0, b"from layer 2\n"), r
        r = vm.exec(["/bin/sh", "-c", "test -e /etc/removed || echo whited-out"])
        assert r.stdout == b"whited-out\n", r
    finally:
        vm.release()


def test_ensure_image_reports_the_image_config(oci_image, tmp_path):
    layout = tmp_path / "same"
    write_layout(layout)
    paths = _core.ensure_image(f"oci:{layout}:v1", NAME, None, None, False, kernel_layer=False)
    assert paths["hash"] == oci_image.hash, "the same manifest is the same cached root"
    oci = paths["oci"]
    assert (oci["env"], oci["working_dir"], oci["user"]) == (["PATH=/bin"], "/etc", None)
    assert oci["manifest_digest"].startswith("sha256:") and len(oci["layers"]) == 2
    assert "oci" not in _core.ensure_image(None, None, None, None, False)
    assert images.ensure_image(f"oci:{layout}:v1", name=NAME, progress=False,
                               kernel_layer=False).oci == oci


def test_image_without_python3_is_refused_with_what_to_use(oci_image, tmp_path):
    """The kernel layer (the default for OCI images) needs python3; the error names the image
    and what to use instead, and nothing is cached under the name."""
    layout = tmp_path / "nopy"
    write_layout(layout)
    with pytest.raises(api.ImageError) as e:
        api.Image.build(ref=f"oci:{layout}:v1", name="test-oci-nopy", snapshot=False, progress=False)
    msg = str(e.value)
    assert f"oci:{layout}:v1" in msg and "no python3" in msg, msg
    assert "python:3.12-slim" in msg and "kernel_layer=False" in msg, msg
    assert not any(i["name"] == "test-oci-nopy" for i in _core.list_images(None))


def test_bad_sources_raise_image_error_with_the_fix(tmp_path):
    _core.remove_image("test-oci-tampered", None)
    with pytest.raises(api.ImageError, match="does not exist"):
        api.Image.build(ref=f"oci:{tmp_path}/missing:v1", snapshot=False, progress=False,
                        kernel_layer=False)
    layout = tmp_path / "layout"
    # A top layer no other test stores: a blob already verified in the store is not read again.
    top = write_layout(layout, greeting=f"tampered {tmp_path}\n".encode())
    data = bytearray(top.read_bytes())
    data[len(data) // 2] ^= 0xFF
    top.write_bytes(bytes(data))
    with pytest.raises(api.ImageError, match="corrupt.*nothing was cached"):
        api.Image.build(ref=f"oci:{layout}:v1", name="test-oci-tampered", snapshot=False,
                        progress=False, kernel_layer=False)
    assert not any(i["name"] == "test-oci-tampered" for i in _core.list_images(None))
