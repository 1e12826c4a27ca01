"""Cache housekeeping on a throw-away cache: `image list` (ref, digest, kernelspecs), `image rm`
with its warm snapshots, `image prune` (stale snapshots, unreferenced blobs and layers, in-use
entries kept) and the size budget (least recently used first).

Images are cheap: a tiny root directory and the two-layer busybox OCI layout of test_oci.py,
built without the kernel layer. Warm snapshots are directories with a metadata.json as the
runtime writes it; no VM is started. Never touches the real cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supermachine_kernel import cli
from supermachine_kernel import images

from .test_oci import BUSYBOX, write_layout

DAY = 86400


def run(capfd, *argv: str):
    code = cli.main(list(argv))
    out = capfd.readouterr()
    return code, out.out, out.err


@pytest.fixture
def kernelspecs(tmp_path: Path, monkeypatch) -> Path:
    """A Jupyter path of the test's own for the kernelspecs it installs (the environment's
    kernelspecs are seen too; they run the default image, which these caches do not hold)."""
    root = tmp_path / "jupyter"
    (root / "kernels").mkdir(parents=True)
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    return root / "kernels"


def install_spec(kernels: Path, name: str, image: str | None) -> None:
    argv = [sys.executable, "-m", "supermachine_kernel.kernel", "-f", "{connection_file}"]
    if image:
        argv.append(f"--MicroVMKernel.image={image}")
    (kernels / name).mkdir()
    (kernels / name / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": name, "language": "python"}))


@pytest.fixture
def oci_ref(tmp_path: Path) -> str:
    if BUSYBOX is None:
        pytest.fail("busybox is missing: install busybox-static (tools/setup-host.sh does)")
    layout = tmp_path / "layout"
    write_layout(layout)
    return f"oci:{layout}:v1"


def build(ref: str, cache: Path, **kw):
    return images.ensure_image(ref, cache_dir=cache, progress=False, require_agent=False,
                               kernel_layer=False if ref.startswith("oci:") else None, **kw)


def fake_snapshot(cache: Path, name: str, image, *, rootfs: str | None = None) -> Path:
    """A warm snapshot directory as the runtime writes one, baked on `image` (or on `rootfs`),
    with a QEMU identity this host does not have (so it is stale unless its image is gone)."""
    d = cache / "snapshots" / name
    d.mkdir(parents=True)
    (d / "memory").write_bytes(os.urandom(64 * 1024))
    (d / "state").write_bytes(b"state")
    meta = {
        "format": "supermachine-snapshot", "version": 1, "kind": "template",
        "created_unix_ms": int(time.time() * 1000),
        "machine": {"memory_mib": 256, "vcpus": 1, "accel": "tcg",
                    "qemu_version": "QEMU emulator version 0.0 (test)",
                    "cmdline_fingerprint": "0" * 64, "kernel_hash": "k", "initrd_hash": "",
                    "rootfs_hash": "r"},
        "kernel": image.kernel, "initrd": "", "rootfs": rootfs or image.rootfs,
        "state": {"size": 5, "xxh3_128": "0" * 32},
        "memory": {"size": 65536, "xxh3_128": "0" * 32},
        "parent": None,
        "labels": {"image": image.name, "image_hash": image.hash},
    }
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


def set_used(path: Path, days_ago: float) -> None:
    stamp = path / "last-used"
    stamp.touch()
    t = time.time() - days_ago * DAY
    os.utime(stamp, (t, t))


def test_list_shows_ref_digest_snapshots_and_kernelspecs(cache: Path, oci_ref: str, tiny_root,
                                                         have_kernel, kernelspecs, capfd):
    oci = build(oci_ref, cache, name="busy")
    tiny = build(str(tiny_root), cache)
    fake_snapshot(cache, "busy-256m-1c-0001", oci)
    install_spec(kernelspecs, "busy-env", oci_ref)
    install_spec(kernelspecs, "plain", None)  # the default image: not in this cache

    code, out, err = run(capfd, "image", "list", "--json", "--cache-dir", str(cache))
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    # The OCI image is named after its reference (no --name for the kernelspec's ref).
    assert set(rows) == {"busy", tiny.name}
    busy = rows["busy"]
    assert busy["ref"] == oci_ref
    assert busy["digest"] == oci.oci["manifest_digest"] and busy["digest"].startswith("sha256:")
    assert busy["snapshots"] == 1 and busy["snapshot_bytes"] >= 64 * 1024
    assert busy["size_bytes"] > 0 and busy["created_unix"] <= busy["last_used_unix"] + 1
    assert rows[tiny.name]["ref"] == str(tiny_root)
    assert rows[tiny.name]["digest"] == f"recipe:{tiny.hash}"
    assert rows[tiny.name]["snapshots"] == 0
    # The kernelspec's image reference names the image by its default name, not "busy".
    assert busy["kernelspecs"] == []

    again = build(oci_ref, cache)  # built under the name the kernelspec's reference gives
    code, out, _ = run(capfd, "image", "list", "--json", "--cache-dir", str(cache))
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows[again.name]["kernelspecs"] == ["busy-env"]

    code, out, _ = run(capfd, "image", "list", "--cache-dir", str(cache))
    header, *lines = out.splitlines()
    assert header.split() == ["NAME", "REF", "DIGEST", "SIZE", "CREATED", "USED", "SNAPSHOTS",
                              "KERNELSPECS", "PYTHON"]
    line = next(x for x in lines if x.startswith(again.name + " "))
    assert "busy-env" in line and oci.oci["manifest_digest"][:19] in line


def test_rm_drops_the_images_snapshots_and_says_what_it_freed(cache: Path, oci_ref: str,
                                                              have_kernel, kernelspecs, capfd):
    a = build(oci_ref, cache, name="a")
    b = build(oci_ref, cache, name="b")  # the same blobs
    snap = fake_snapshot(cache, "a-256m-1c-0001", a)
    blobs = cache / "oci" / "blobs" / "sha256"
    n_blobs = len(list(blobs.iterdir()))

    code, out, err = run(capfd, "image", "rm", "a", "--dry-run", "--cache-dir", str(cache))
    assert code == 0, err
    assert "would remove image a" in out and snap.is_dir() and Path(a.dir).is_dir()

    code, out, err = run(capfd, "image", "rm", "a", "--cache-dir", str(cache))
    assert code == 0, err
    assert "removed image a" in out and f"removed snapshot {snap.name}" in out
    freed = int(re_search(r"freed ([\d.]+) (KB|MB|GB)", out))
    assert freed > 0
    assert not snap.exists() and not Path(a.dir).exists()
    # b shares every blob with a: they stay.
    assert len(list(blobs.iterdir())) == n_blobs and Path(b.rootfs).is_file()
    assert [i.name for i in images.list_images(cache)] == ["b"]

    install_spec(kernelspecs, "b-env", "b")
    code, out, _ = run(capfd, "image", "rm", "b", "--cache-dir", str(cache))
    assert code == 0 and "removed image b" in out
    assert "kernelspec b-env runs it" in out and "prepare --kernel b-env" in out
    assert list(blobs.iterdir()) == []  # nothing uses them any more


def re_search(pattern: str, text: str) -> float:
    import re

    m = re.search(pattern, text)
    assert m, text
    return float(m.group(1))


def test_prune_removes_stale_and_unreferenced_keeps_referenced(cache: Path, oci_ref: str,
                                                               tiny_root, have_kernel,
                                                               kernelspecs, capfd):
    img = build(oci_ref, cache, name="busy")
    tiny = build(str(tiny_root), cache)
    blobs = cache / "oci" / "blobs" / "sha256"
    referenced = sorted(p.name for p in blobs.iterdir())
    orphan_blob = blobs / ("ab" * 32)
    orphan_blob.write_bytes(b"left by an image removed long ago")
    orphan_layer = cache / "layers" / "pip" / "0123456789abcdef"
    (orphan_layer / "tree").mkdir(parents=True)
    (orphan_layer / "tree" / "x.py").write_text("x = 1\n")
    stale = fake_snapshot(cache, "busy-256m-1c-stale", img)
    gone = fake_snapshot(cache, "old-256m-1c-gone", img, rootfs=str(cache / "images/old/1/rootfs.erofs"))
    hints = cache / "launch-hints"
    hints.mkdir()
    (hints / "h1.json").write_text(json.dumps({"format": 1, "snapshot": str(stale)}))
    (hints / "h2.json").write_text(json.dumps({"format": 1, "snapshot": str(cache / "snapshots/nope")}))
    leftover = cache / "tmp" / "build-x-1"
    leftover.mkdir(parents=True)

    code, out, err = run(capfd, "image", "prune", "--dry-run", "--cache-dir", str(cache))
    assert code == 0, err
    assert "would free" in out and orphan_blob.exists() and stale.exists()

    report = images.prune(cache)
    removed = {(e.kind, Path(e.path).name) for e in report.removed}
    assert ("blob", orphan_blob.name) in removed and ("layer", orphan_layer.name) in removed
    assert ("snapshot", stale.name) in removed and ("snapshot", gone.name) in removed
    assert ("hint", "h1.json") in removed and ("hint", "h2.json") in removed
    assert ("leftover", leftover.name) in removed
    reasons = {Path(e.path).name: e.reason for e in report.removed}
    assert "QEMU" in reasons[stale.name] and "no longer exists" in reasons[gone.name]
    for p in (orphan_blob, orphan_layer, stale, gone, leftover, hints / "h1.json"):
        assert not p.exists(), p
    # What the images use stays, and so do the images.
    assert sorted(p.name for p in blobs.iterdir()) == referenced
    assert Path(img.rootfs).is_file() and Path(tiny.rootfs).is_file()
    assert report.freed_bytes == sum(e.bytes for e in report.removed) > 0

    # --all: images no kernelspec runs go too, with their blobs; a kernelspec's image stays.
    install_spec(kernelspecs, "tiny-env", str(tiny_root))
    code, out, err = run(capfd, "image", "prune", "--all", "--cache-dir", str(cache))
    assert code == 0, err
    assert [i.name for i in images.list_images(cache)] == [tiny.name]
    assert list(blobs.iterdir()) == []


def test_budget_evicts_least_recently_used_first(cache: Path, tiny_root: Path, tmp_path: Path,
                                                 have_kernel, kernelspecs, capfd):
    other = tmp_path / "other-root"
    (other / "usr" / "bin").mkdir(parents=True)
    (other / "etc").mkdir(parents=True)
    (other / "etc" / "data").write_bytes(os.urandom(200_000))
    old = build(str(tiny_root), cache, name="old")
    new = build(str(other), cache, name="new")
    set_used(Path(old.dir), 3)
    set_used(Path(new.dir), 1)
    sizes = {e.name.split("/")[0]: e.bytes for e in images.inventory(cache) if e.kind == "image"}
    total = sum(e.bytes for e in images.inventory(cache))
    budget = total - 1  # one image has to go: the least recently used

    code, out, err = run(capfd, "image", "prune", "--budget", str(budget), "--dry-run",
                         "--cache-dir", str(cache))
    assert code == 0, err
    assert "would remove image old/" in out and "image new/" not in out
    assert len(images.list_images(cache)) == 2

    report = images.prune(cache, policy=False, budget=budget)
    assert [e.name.split("/")[0] for e in report.removed if e.kind == "image"] == ["old"]
    assert [i.name for i in images.list_images(cache)] == ["new"]
    assert report.total_bytes - report.freed_bytes <= budget
    assert sizes["old"] > 0

    # Now the older one is "new"'s: a budget of 1 byte evicts it, unless a kernelspec runs it.
    install_spec(kernelspecs, "new-env", "new")
    report = images.prune(cache, policy=False, budget=1)
    assert not any(e.kind == "image" for e in report.removed)
    assert "over the budget" in " ".join(report.notes)


def test_budget_from_the_environment_applies_after_a_build(cache: Path, tiny_root: Path,
                                                           tmp_path: Path, have_kernel,
                                                           kernelspecs, monkeypatch, capfd):
    first = build(str(tiny_root), cache, name="first")
    set_used(Path(first.dir), 2)
    other = tmp_path / "second-root"
    (other / "usr" / "bin").mkdir(parents=True)
    (other / "etc").mkdir(parents=True)
    (other / "etc" / "x").write_text("x\n")
    monkeypatch.setenv(images.BUDGET_ENV, "1")
    code, out, err = run(capfd, "image", "build", str(other), "--name", "second", "-q",
                         "--cache-dir", str(cache))
    assert code == 0, err
    assert "cache budget" in out
    # The older image went; the one just built stays although the budget is not met.
    assert {i.name for i in images.list_images(cache)} == {"second"}
    monkeypatch.setenv(images.BUDGET_ENV, "lots")
    code, _, err = run(capfd, "image", "prune", "--dry-run", "--cache-dir", str(cache))
    assert code == 2 and "SUPERMACHINE_CACHE_BUDGET" in err


def test_an_in_use_snapshot_survives_prune(cache: Path, oci_ref: str, have_kernel, kernelspecs):
    img = build(oci_ref, cache, name="busy")
    snap = fake_snapshot(cache, "busy-256m-1c-running", img)  # stale: another QEMU
    # A process with the memory file open, as QEMU has it mapped while a VM runs from it.
    with open(snap / "memory", "rb") as memory:
        holder = subprocess.Popen(["sleep", "300"], stdin=memory)
    try:
        report = images.prune(cache, all=True, budget=1)
        assert snap.is_dir() and Path(img.rootfs).is_file()
        assert {Path(e.path).name for e in report.in_use} >= {snap.name}
        assert any(e.kind == "snapshot" and e.in_use for e in images.inventory(cache))
        # rm of its image keeps what the VM uses too, and says so.
        rm = images.prune(cache, remove=["busy"], policy=False, keep=[])
        assert rm.removed == [] and [e.kind for e in rm.in_use] == ["image"]
        assert Path(img.rootfs).is_file()
    finally:
        holder.kill()
        holder.wait()
    report = images.prune(cache)
    assert snap.name in {Path(e.path).name for e in report.removed} and not snap.exists()


def test_parse_size():
    assert images.parse_size("20G") == 20 * 10**9
    assert images.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert images.parse_size("500MB") == 500 * 10**6
    assert images.parse_size("800") == 800
    with pytest.raises(ValueError, match="not a size"):
        images.parse_size("twenty")


def test_kernelspec_image_ref():
    base = ["python", "-m", "supermachine_kernel.kernel", "-f", "{connection_file}"]
    assert images.kernelspec_image_ref(base) == "default"
    assert images.kernelspec_image_ref(base + ["--MicroVMKernel.image=python:3.12-slim"]) == \
        "python:3.12-slim"
    assert images.kernelspec_image_ref(base + ["--MicroVMKernel.image", "x"]) == "x"
    assert images.kernelspec_image_ref(["python", "-m", "ipykernel_launcher"]) is None
