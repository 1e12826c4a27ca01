"""The host-wide image store (api.shared_cache_dir, `--shared`): a kernel start that finds its
image only there takes the admin's warm snapshot as it is, or fails at once with the admin's
command; it never builds or bakes. (A non-root user restoring from it: tests/hub/.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supermachine_kernel import api, images

REAL_CACHE = Path(images.cache_dir())  # where make setup built the default image

@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    own = tmp_path / "own"
    own.mkdir()
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(own))
    return own


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv(api.SHARED_CACHE_ENV, str(store))
    return store


def _link_default_image(store: Path, parts: tuple = ("images/default", "kernels", "initramfs")) -> None:
    """The store as `image build --shared` leaves it, from the real cache's built image."""
    real = REAL_CACHE
    for sub in parts:
        if not (real / sub).is_dir():
            pytest.skip("the default image is not built (make setup)")
        (store / sub).mkdir(parents=True)
        for entry in os.listdir(real / sub):
            if not entry.startswith("."):
                subprocess.run(["cp", "-al", str(real / sub / entry), str(store / sub)], check=True)


def test_the_store_is_named_by_the_variable_and_must_exist(store: Path, own_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert api.shared_cache_dir() == str(store)
    monkeypatch.setenv(api.SHARED_CACHE_ENV, str(store / "absent"))
    assert api.shared_cache_dir() is None
    monkeypatch.setenv(api.SHARED_CACHE_ENV, str(own_cache))  # the own cache is not "shared"
    assert api.shared_cache_dir() is None


def test_no_image_anywhere_fails_at_once_naming_the_admins_command(own_cache: Path, store: Path) -> None:
    with pytest.raises(api.ImageNotBuiltError) as e:
        api.Image.build(cached_only=True, progress=False, warmup=lambda vm: None, warmup_tag="t")
    assert str(store) in str(e.value) and "prepare --shared" in str(e.value)
    # Nothing built there (a reader's lock is all; a user who may not write skips it).
    assert set(os.listdir(store)) <= {"locks"}


def test_a_missing_warm_snapshot_in_the_store_fails_at_once(own_cache: Path, store: Path) -> None:
    _link_default_image(store)
    plain = api.Image.build(cached_only=True, snapshot=False, progress=False)
    assert plain.rootfs.startswith(str(store) + os.sep)
    with pytest.raises(api.ImageNotBuiltError) as e:
        api.Image.build(cached_only=True, progress=False, warmup=lambda vm: None,
                        warmup_tag="never-baked")
    assert "warm snapshot" in str(e.value) and "prepare --shared" in str(e.value)
    assert not (store / "snapshots").exists()  # nothing was baked
    assert not (own_cache / "snapshots").exists() or not os.listdir(own_cache / "snapshots")


def test_a_store_that_does_not_fit_this_installation_fails_at_once(own_cache: Path, store: Path) -> None:
    """No initramfs for this installation's agent there (an upgrade since the admin prepared
    it; here the folder cannot be made): the admin's command, not an I/O error."""
    _link_default_image(store, ("images/default", "kernels"))
    (store / "initramfs").write_text("not a folder")
    with pytest.raises(api.ImageNotBuiltError) as e:
        api.Image.build(cached_only=True, snapshot=False, progress=False)
    assert "does not fit this installation" in str(e.value) and "prepare --shared" in str(e.value)


def test_cli_shared_and_cache_dir_exclude_each_other(store: Path) -> None:
    cli = Path(sys.executable).with_name("supermachine-kernel")
    r = subprocess.run([str(cli), "image", "list", "--shared", "--cache-dir", str(store)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not both" in r.stderr


def test_cli_shared_lists_the_store(store: Path) -> None:
    cli = Path(sys.executable).with_name("supermachine-kernel")
    r = subprocess.run([str(cli), "image", "list", "--shared"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(store) in r.stdout  # "no images in <store>"
