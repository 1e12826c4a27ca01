"""Package layers on an OCI image: the kernel layer and ``packages=``, for the guest's Python.

The image is an OCI layout of a Debian bookworm root with python3 and python3-six only
(``debian_layout.py``: mmdebstrap, ~20 s; cached under the image cache's ``test/``, so later
runs start at once). Six 1.16.0 from Debian is the version the layers must not
override. Resolving and installing use the host's pip and PyPI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from supermachine_kernel import api, cli
from supermachine_kernel.api import _core
from supermachine_kernel import images
from supermachine_kernel.cli.install import environment_args
from supermachine_kernel.repl_client.backend import driver_source, read_ready_frame
from supermachine_kernel.repl_client.vm import GUEST_DRIVER_PATH, REPL_ARGV

from .debian_layout import CannotBuild
from .debian_layout import debian_python_layout as build_debian_python_layout
from .debian_layout import write_layout as _write_layout

NAME = "test-oci-debian-py"


@pytest.fixture(scope="session")
def debian_python_layout() -> Path:
    """oci:<layout>:v1 — Debian bookworm with python3 and python3-six, built once and cached."""
    try:
        return build_debian_python_layout(images.cache_dir())
    except CannotBuild as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def built(debian_python_layout):
    """The image with the kernel layer and ``packages=["six", "attrs"]``, and its build time."""
    ref = f"oci:{debian_python_layout}:v1"
    t = time.monotonic()
    paths = images.ensure_image(ref, name=NAME, progress=True, packages=["six", "attrs"])
    first = time.monotonic() - t
    print(f"\nfirst build (kernel layer + packages, layout cached): {first:.1f} s")
    yield ref, paths
    _core.remove_image(NAME, None)


def _layers(paths) -> dict:
    return {l["kind"]: l for l in paths.oci["pip_layers"]}


def test_guest_python_is_detected_from_the_image(built):
    _, paths = built
    g = paths.oci["guest"]
    assert (g["python"], g["version"]) == ("/usr/bin/python3", "3.11")
    assert g["platforms"][0] == "manylinux_2_36_x86_64"
    assert g["site"] == "/usr/local/lib/python3.11/dist-packages"
    assert g["installed"]["six"] == "1.16.0"
    assert paths.python_version.startswith("3.11.")


def test_layers_add_what_is_missing_and_keep_the_images_versions(built):
    _, paths = built
    layers = _layers(paths)
    kernel = {p.split("==")[0] for p in layers["kernel"]["pins"]}
    assert {"ipython", "comm", "matplotlib-inline", "ipywidgets", "traitlets"} <= kernel
    added = {p.split("==")[0] for p in layers["packages"]["pins"]}
    assert "attrs" in added
    assert "six" not in added, "the image's six 1.16.0 is kept, not installed again"
    assert not added & kernel, "the packages layer does not repeat the kernel layer"


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_guest_imports_the_layers(built):
    """A cold boot of the stacked root: the REPL's stack (IPython runs a cell, comm, ipywidgets)
    and the packages import, with six from Debian's dist-packages; the image config's Env
    reaches guest processes; the kernel's guest REPL starts with IPython and comms."""
    ref, _ = built
    img = api.Image.build(ref=ref, name=NAME, packages=["six", "attrs"], snapshot=False,
                          progress=False)
    assert img.env.get("SMK_FROM_IMAGE") == "yes"
    vm = img.boot()
    try:
        code = (
            "import importlib.util, os, IPython, comm, ipywidgets, attrs, six\n"
            # matplotlib-inline is there for when the user adds matplotlib (it imports it).
            "assert importlib.util.find_spec('matplotlib_inline') is not None\n"
            "from IPython.core.interactiveshell import InteractiveShell\n"
            "sh = InteractiveShell.instance()\n"
            "sh.run_cell('x = 21 * 2', silent=True)\n"
            "print(sh.user_ns['x'], six.__version__, six.__file__, attrs.__file__, os.environ['SMK_FROM_IMAGE'])\n"
        )
        r = vm.exec(["python3", "-c", code], timeout_ms=300_000)
        assert r.exit_code == 0, r.stderr.decode(errors="replace")[-3000:]
        result, six_version, six_file, attrs_file, from_image = r.stdout.decode().split()
        assert (result, six_version, from_image) == ("42", "1.16.0", "yes")
        assert six_file.startswith("/usr/lib/python3/dist-packages/")
        assert attrs_file.startswith("/usr/local/lib/python3.11/dist-packages/")
        # The kernel's guest REPL itself, as the kernel starts it: IPython executor, comms on.
        vm.write_file(GUEST_DRIVER_PATH, driver_source(), mode=0o644)
        child = vm.spawn(REPL_ARGV, cwd="/root")
        try:
            ready = read_ready_frame(child, timeout=300)
        finally:
            child.signal(9)
        assert (ready["executor"], ready["comms"]) == ("ipython", True), ready
        assert ready["python_version"].startswith("3.11."), ready
    finally:
        vm.release()


def test_cache_hit_and_a_changed_list_reuses_the_kernel_layer(built):
    ref, paths = built
    t = time.monotonic()
    again = images.ensure_image(ref, name=NAME, progress=False, packages=["six", "attrs"])
    print(f"\ncache hit: {(time.monotonic() - t) * 1000:.0f} ms")
    assert again.hash == paths.hash and again.rootfs == paths.rootfs
    same = images.ensure_image(ref, name=NAME, progress=False, packages=["attrs"])
    assert same.hash == paths.hash, "six resolves to the image's own: the same set, the same root"
    other = images.ensure_image(ref, name=NAME, progress=False, packages=["attrs", "iniconfig"])
    assert other.hash != paths.hash, "another resolved set is another root"
    assert _layers(other)["kernel"]["key"] == _layers(paths)["kernel"]["key"]
    assert {p.split("==")[0] for p in _layers(other)["packages"]["pins"]} == {"attrs", "iniconfig"}


def _set_last_used(image_dir: str, days_ago: float) -> None:
    stamp = Path(image_dir) / "last-used"
    stamp.touch()
    t = time.time() - days_ago * 86400
    os.utime(stamp, (t, t))


def test_environments_on_one_base_image_never_evict_each_other(debian_python_layout, tmp_path,
                                                               monkeypatch):
    """Two kernelspecs on one base image with different package lists: each environment's
    image has a name of its own (the package list's hash), so building one never removes the
    other as an older version of a shared name, however long that one went unused; `image
    prune` and the cache budget keep both (each is what a kernelspec runs); the kernel's lookup
    (``cached_only``) finds each; `image list` says which kernelspec runs which."""
    ref = f"oci:{debian_python_layout}:v1"
    envs = {"env-a": ["attrs"], "env-b": ["attrs", "iniconfig"]}
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    for spec, packages in envs.items():
        (jupyter / "kernels" / spec).mkdir(parents=True)
        argv = [sys.executable, "-m", "supermachine_kernel.kernel", "-f", "{connection_file}",
                *environment_args(ref, packages, None)]
        (jupyter / "kernels" / spec / "kernel.json").write_text(
            json.dumps({"argv": argv, "display_name": spec, "language": "python"}))
    plain = images.image_name_for(ref)
    names = {spec: images.image_name_for(ref, packages=p) for spec, p in envs.items()}
    assert names["env-a"] != names["env-b"]
    assert all(n.startswith(f"{plain}-") for n in names.values()), names
    try:
        a = images.ensure_image(ref, progress=False, packages=envs["env-a"])
        _set_last_used(a.dir, days_ago=2)
        # A new build removes its name's versions unused for a day: not the other environment.
        b = images.ensure_image(ref, progress=False, packages=envs["env-b"])
        assert (a.name, b.name) == (names["env-a"], names["env-b"])
        assert Path(a.rootfs).is_file(), "building env-b removed env-a's image"
        for spec, want in (("env-a", a), ("env-b", b)):
            found = api.Image.build(ref=ref, packages=envs[spec], cached_only=True,
                                    snapshot=False, progress=False)
            assert (found.name, found.hash, found.rootfs) == (want.name, want.hash, want.rootfs)
        for d in (a.dir, b.dir):
            _set_last_used(d, days_ago=2)
        # Dry runs over the real cache: nothing is removed.
        for kw in ({}, {"budget": 1}):
            report = images.prune(dry_run=True, **kw)
            gone = {os.path.realpath(e.path) for e in report.removed}
            assert not {os.path.realpath(a.dir), os.path.realpath(b.dir)} & gone, kw
        rows = [r for r in cli.image_rows(None) if r["name"] in names.values()]
        assert sorted((r["name"], r["kernelspecs"], r["ref"]) for r in rows) == sorted(
            (names[spec], [spec], ref) for spec in envs)
        assert {r["digest"] for r in rows} == {a.oci["manifest_digest"]}
    finally:
        for n in names.values():
            _core.remove_image(n, None)


def test_requirements_file(built, tmp_path):
    ref, paths = built
    req = tmp_path / "requirements.txt"
    req.write_text("attrs\nsix\n")
    p = images.ensure_image(ref, name=NAME, progress=False, requirements=req)
    assert _layers(p)["packages"] == _layers(paths)["packages"], "same resolved set, same layer"
    with pytest.raises(api.ImageError, match="cannot read requirements file"):
        images.ensure_image(ref, name=NAME, progress=False, requirements=tmp_path / "missing.txt")


def test_a_version_the_image_has_is_not_overridden(built):
    ref, _ = built
    with pytest.raises(api.ImageError) as e:
        images.ensure_image(ref, name=NAME, progress=False, packages=["six==1.17.0"])
    msg = str(e.value)
    assert "six==1.16.0" in msg and "already has" in msg and ref in msg, msg


def test_a_package_without_a_wheel_names_it_and_the_guest(built):
    ref, _ = built
    # docopt 0.6.2 is published as an sdist only.
    with pytest.raises(api.ImageError) as e:
        images.ensure_image(ref, name=NAME, progress=False, packages=["docopt==0.6.2"])
    msg = str(e.value)
    assert "docopt" in msg and "Python 3.11" in msg and "manylinux_2_36_x86_64" in msg, msg


def test_packages_need_an_oci_image():
    with pytest.raises(api.ImageError, match="OCI images only"):
        images.ensure_image("minimal", progress=False, packages=["attrs"])


def test_cross_install_for_another_python(tmp_path):
    """An image whose python3 is /usr/local/bin/python3.12 (python:3.12-slim's layout; the
    files are stand-ins, nothing from an image runs on the host) gets a kernel layer of wheels
    for CPython 3.12 in its site-packages; the host (3.11) writes no bytecode for it."""
    root = tmp_path / "root"
    for d in ("usr/local/bin", "usr/local/lib/python3.12/site-packages/pip-24.0.dist-info",
              "lib/x86_64-linux-gnu"):
        (root / d).mkdir(parents=True)
    (root / "usr/local/bin/python3.12").write_bytes(b"\x7fELF stand-in")
    (root / "usr/local/bin/python3").symlink_to("python3.12")
    (root / "usr/local/lib/python3.12/os.py").write_text("")
    (root / "lib/x86_64-linux-gnu/libc.so.6").write_bytes(b"\0GLIBC_2.17\0GLIBC_2.36\0")
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(root, arcname=".")
    layout = tmp_path / "layout"
    _write_layout(layout, tar, ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHON_VERSION=3.12.7"])
    name = "test-oci-py312-standin"
    try:
        p = images.ensure_image(f"oci:{layout}:v1", name=name, progress=False)
        g = p.oci["guest"]
        assert (g["python"], g["version"], g["site"]) == (
            "/usr/local/bin/python3", "3.12", "/usr/local/lib/python3.12/site-packages")
        assert p.python_version == "3.12.7"
        pins = {x.split("==")[0] for x in _layers(p)["kernel"]["pins"]}
        assert "ipython" in pins and "pip" not in pins
        if shutil.which("dump.erofs") is None:
            pytest.skip("dump.erofs not installed (apt-get install erofs-utils)")
        ls = subprocess.run(["dump.erofs", "--path=/usr/local/lib/python3.12/site-packages/IPython",
                             "--ls", p.rootfs], capture_output=True, text=True, check=True).stdout
        assert "__init__.py" in ls and "__pycache__" not in ls, ls
    finally:
        _core.remove_image(name, None)
