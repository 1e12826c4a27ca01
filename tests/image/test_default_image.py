"""The default image as setup builds it: cached, with Python 3.11 and the pinned stack inside."""
from pathlib import Path

from supermachine_kernel import images

from .conftest import erofs_ls

SITE = "/usr/local/lib/python3.11/dist-packages"


def test_default_image_is_cached_and_complete():
    p = images.ensure_image(progress=False, require_agent=False)  # builds it if setup has not
    assert p.name == "default"
    assert p.python_version and p.python_version.startswith("3.11")
    for f in (p.rootfs, p.kernel):
        assert Path(f).is_file() and Path(f).stat().st_size > 1_000_000
    assert any(i.name == "default" and i.hash == p.hash for i in images.list_images())
    assert p.modules[:2] == ("virtio_ring", "virtio") and "erofs" in p.modules


def test_default_rootfs_has_the_scientific_stack():
    p = images.ensure_image(progress=False, require_agent=False)
    site = erofs_ls(p.rootfs, SITE)
    for pkg in ("numpy", "pandas", "matplotlib", "IPython", "ipywidgets"):
        assert pkg in site.split(), f"{pkg} missing from {SITE}"
    numpy = erofs_ls(p.rootfs, f"{SITE}/numpy")
    assert "__pycache__" in numpy.split(), "bytecode is precompiled"


def test_default_rootfs_carries_nothing_from_the_host():
    p = images.ensure_image(progress=False, require_agent=False)
    etc = erofs_ls(p.rootfs, "/etc").split()
    assert "resolv.conf" not in etc
    assert "hosts" in etc and "hostname" in etc
