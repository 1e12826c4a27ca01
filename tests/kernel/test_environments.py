"""One kernelspec per environment: a notebook kernel on an OCI image of its own, with the kernel
layer and a package list, the image config's WorkingDir and User applied to the guest REPL, and
a kernel whose image is not built refusing at once with the command that builds it.

The image is the Debian bookworm python3-only layout of tests/image (cached under the image
cache's ``test/``) plus a small layer of this module's: ``/work`` owned by uid 1000 and a
passwd entry for it; its config sets ``WorkingDir=/work`` and ``User=1000``. It is built and
its warm snapshot baked once by ``supermachine-kernel prepare``'s function, and kept in the
cache, so later runs only restore it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from supermachine_kernel import images
from supermachine_kernel.cli.install import install, prepare

from .harness import BACKEND, Kernel, stdout_of

pytestmark = pytest.mark.skipif(BACKEND != "vm", reason="environments are guest images: VM backend")

LAYOUT_VERSION = "1"  # bump to rebuild this module's layout
BUILT = "smk-env-test"
UNBUILT = "smk-env-unbuilt"
PACKAGES = ["attrs"]
PASSWD_LINE = "jovyan:x:1000:100:Jupyter user:/work:/bin/sh\n"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int,
                uid: int = 0, gid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, 0
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _user_layout(base: Path, dest: Path) -> None:
    """An OCI layout of `base`'s layer + a layer with /work (uid 1000) and /etc/passwd with a
    line for uid 1000; config WorkingDir=/work, User=1000."""
    index = json.loads((base / "index.json").read_text())
    blobs = base / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    base_layer = manifest["layers"][0]
    base_tar = blobs / base_layer["digest"].split(":")[1]
    with tarfile.open(base_tar) as t:
        member = next(m for m in t if m.name.lstrip("./") == "etc/passwd")
        passwd = t.extractfile(member).read()  # type: ignore[union-attr]
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        _tar_member(t, "work", None, 0o755, 1000, 100)
        _tar_member(t, "work/hello.txt", b"hi\n", 0o644, 1000, 100)
        _tar_member(t, "etc/passwd", passwd + PASSWD_LINE.encode(), 0o644)
    out = dest / "blobs" / "sha256"
    out.mkdir(parents=True)
    os.link(base_tar, out / base_tar.name)

    def blob(data: bytes, media_type: str) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (out / d).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{d}", "size": len(data)}

    top = blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "WorkingDir": "/work",
                   "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": [base_layer["digest"], top["digest"]]},
    }
    cfg = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    m = blob(json.dumps({"schemaVersion": 2,
                         "mediaType": "application/vnd.oci.image.manifest.v1+json",
                         "config": cfg, "layers": [base_layer, top]}).encode(),
             "application/vnd.oci.image.manifest.v1+json")
    m["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [m]}))


@pytest.fixture(scope="session")
def user_layout() -> Path:
    test_dir = Path(images.cache_dir()) / "test"
    final = test_dir / f"oci-debian-python3-user-v{LAYOUT_VERSION}"
    if not (final / "index.json").is_file():
        # tests/image/test_layers.py's layout (its debian_python_layout fixture builds it).
        base = test_dir / "oci-debian-python3-v1"
        if not (base / "index.json").is_file():
            pytest.skip(f"no {base}: run tests/image/test_layers.py first (it builds it)")
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        _user_layout(base, tmp)
        tmp.rename(final)
    return final


@pytest.fixture(scope="session")
def environments(user_layout: Path):
    """Two kernelspecs on the user layout: BUILT (prepared: image built, snapshot baked) and
    UNBUILT (a package list never built), on a JUPYTER_PATH of their own."""
    root = tempfile.mkdtemp(prefix="smk-env-kernelspecs-")
    image = f"oci:{user_layout}:v1"
    extra = ["--MicroVMKernel.pool_min=0"]  # as conftest: no spare VMs on a 2-core host
    install(prefix=root, kernel_name=BUILT, image=image, packages=PACKAGES, extra_args=extra)
    install(prefix=root, kernel_name=UNBUILT, image=image, packages=["attrs", "iniconfig"],
            extra_args=extra)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (os.path.join(root, "share", "jupyter"), old) if p)
    t = time.monotonic()
    prepare(BUILT)
    print(f"\nprepare --kernel {BUILT}: {time.monotonic() - t:.1f} s")
    yield image
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="module")
def env_kernel(environments):
    k = Kernel(BUILT)
    yield k
    k.shutdown()


def test_the_environment_kernel_runs_its_packages_on_the_guests_python(env_kernel):
    msg_id = env_kernel.kc.kernel_info()
    info = env_kernel.reply(msg_id)
    version = info["language_info"]["version"]
    assert version.startswith("3.11."), info["language_info"]  # Debian bookworm's python3
    reply, outputs = env_kernel.execute(
        "import sys, attrs\nprint('.'.join(map(str, sys.version_info[:3])), attrs.__name__)",
        timeout=120)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs).split() == [version, "attrs"]


def test_working_dir_and_user_of_the_image_config_apply_to_the_repl(env_kernel):
    reply, outputs = env_kernel.execute(
        "import os\nprint(os.getuid(), os.getgid(), os.getcwd(), os.environ['HOME'], "
        "open('hello.txt').read().strip())\n"
        "open('written-by-the-user.txt', 'w').write('x')", timeout=60)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs).split() == ["1000", "100", "/work", "/work", "hi"]
    reply, _ = env_kernel.execute("open('/etc/passwd', 'a')", timeout=60)
    assert reply["status"] == "error" and reply["ename"] == "PermissionError", reply


def test_an_image_without_a_user_runs_as_jovyan(kernel):
    """The built-in image's config has no User: the REPL runs as the unprivileged guest user
    (c.MicroVMKernel.guest_user '', repl_client/guest_user.py) in its home."""
    assert kernel.value("import os; (os.getuid(), os.getcwd())", timeout=60) == \
        "(1000, '/home/jovyan')"


def test_an_unbuilt_environment_refuses_at_once_with_the_build_command(environments):
    cached = {(i.name, i.hash) for i in images.list_images()}
    t = time.monotonic()
    k = Kernel(UNBUILT)
    try:
        reply, outputs = k.execute("1 + 1", timeout=30)
        took = time.monotonic() - t
        assert reply["status"] == "error", reply
        assert reply["ename"] == "GuestUnavailable"
        assert "not built yet" in reply["evalue"]
        assert f"supermachine-kernel prepare --kernel {UNBUILT}" in reply["evalue"]
        errors = [m for m in outputs if m["msg_type"] == "error"]
        assert errors and f"prepare --kernel {UNBUILT}" in errors[0]["content"]["evalue"]
        # The kernel stays up and says it again on the next cell (nothing was pulled or built).
        again, _ = k.execute("2 + 2", timeout=30)
        assert again["status"] == "error" and "not built yet" in again["evalue"]
        assert k.km.is_alive()
        print(f"\nunbuilt environment: kernel start to the refusal: {took:.1f} s")
    finally:
        k.shutdown()
    assert {(i.name, i.hash) for i in images.list_images()} == cached, "nothing was built"


def test_the_kernel_uses_an_image_of_its_own(environments):
    """The environment's image is the layout's, distinct from the built-in one; with the
    packages it is its own cache entry (so its own warm snapshot key)."""
    from supermachine_kernel import api

    default = api.Image.build(cached_only=True, snapshot=False, progress=False)
    env = api.Image.build(ref=environments, packages=PACKAGES, cached_only=True, snapshot=False,
                          progress=False)
    assert (env.name, env.hash) != (default.name, default.hash)
    assert (env.working_dir, env.user) == ("/work", "1000")
    assert (default.working_dir, default.user) == (None, None)
    with pytest.raises(api.ImageNotBuiltError, match="packages attrs iniconfig"):
        api.Image.build(ref=environments, packages=["attrs", "iniconfig"], cached_only=True,
                        snapshot=False, progress=False)



def test_the_printed_build_commands_work(environments):
    """What the refusal prints, run as a user would: `prepare --kernel NAME` (on the prepared
    environment: a cache hit and one kernel start) and `prepare --image REF --packages ...`."""
    cli = Path(sys.executable).with_name("supermachine-kernel")
    r = subprocess.run([str(cli), "prepare", "--kernel", BUILT], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"kernel {BUILT} ready" in r.stdout
    r = subprocess.run([str(cli), "prepare", "--image", environments, "--packages", *PACKAGES],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "python 3.11." in r.stdout
