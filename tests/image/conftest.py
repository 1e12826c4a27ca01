"""Fixtures for the image tests: a throw-away cache that borrows the real cache's kernels."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from supermachine_kernel import images


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty cache root whose `kernels/` is the real cache's (so no kernel download)."""
    root = tmp_path / "cache"
    root.mkdir()
    real = Path(images.cache_dir()) / "kernels"
    if real.is_dir():
        (root / "kernels").symlink_to(real)
    return root


@pytest.fixture
def have_kernel(cache: Path) -> None:
    if not (cache / "kernels").exists():
        pytest.skip("no guest kernel cached yet (run `supermachine-kernel image build`)")


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A tiny root filesystem tree: enough to be accepted, packed in well under a second."""
    root = tmp_path / "tiny-root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("tiny\n")
    (root / "usr" / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    return root


def erofs_ls(image: str, path: str) -> str:
    """`dump.erofs --ls` of one directory inside an erofs image."""
    if shutil.which("dump.erofs") is None:
        pytest.skip("dump.erofs not installed (apt-get install erofs-utils)")
    out = subprocess.run(
        ["dump.erofs", f"--path={path}", "--ls", image],
        capture_output=True, text=True, check=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    return out.stdout
