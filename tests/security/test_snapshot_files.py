"""Stored snapshots are immutable in practice (issue 16 item 4): a restore maps a snapshot's
memory file private copy-on-write, so a rewrite in place would change what running guests see.
Their files are read-only once committed, the store refuses to write over a snapshot, restore
and deletion still work, and a non-root owner's in-place write is refused. Real microVMs."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time

import psutil
import pytest

from supermachine_kernel import api
from supermachine_kernel.machine.snapshot_store import (
    NotebookSnapshot,
    SnapshotStore,
    StoreError,
)

pytestmark = pytest.mark.vm

FILES = ("metadata.json", "state", "memory")



def fingerprint(path: str) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime_ns, sha256) of each file of a snapshot."""
    out = {}
    for name in FILES:
        st = os.stat(os.path.join(path, name))
        with open(os.path.join(path, name), "rb") as f:
            out[name] = (st.st_ino, st.st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest())
    return out


def test_stored_snapshot_is_read_only_not_rewritten_restorable_and_deletable(image, tmp_path):
    nb = SnapshotStore(str(tmp_path / "store")).notebook("nb-test", "a test notebook")
    with image.boot() as vm:
        vm.write_file("/root/marker", b"taken")
        path = nb.reserve("s1")
        vm.snapshot(path)
        nb.record(NotebookSnapshot(name="s1", created=time.time()))
        for name in FILES:
            mode = stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode)
            assert mode == 0o444, f"{name} is {oct(mode)}"
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o200, "the directory stays deletable"
        before = fingerprint(path)
        # Writing over a stored snapshot is refused, by the store and by the runtime.
        with pytest.raises(StoreError, match="already exists"):
            nb.reserve("s1")
        with pytest.raises(api.SnapshotError, match="already exists"):
            vm.snapshot(path)
        vm.write_file("/root/marker", b"changed after")
        assert fingerprint(path) == before
    with api.Image.from_snapshot(path).boot() as restored:
        assert restored.read_file("/root/marker") == b"taken"
        # QEMU maps the memory file private and holds it open read-only (the ro_ram preload).
        memory = os.path.realpath(os.path.join(path, "memory"))
        opened = [f for f in psutil.Process(restored.qemu_pid).open_files() if f.path == memory]
        assert opened and all(f.mode == "r" for f in opened), opened
    assert fingerprint(path) == before  # a restore maps it, never writes it
    assert nb.delete("s1") > 0
    assert not os.path.exists(path)
    assert nb.entries() == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to act as another user (setpriv)")
def test_owner_that_is_not_root_cannot_write_in_place_but_can_delete(image):
    """Root ignores file modes; the protection is for users. The snapshot is handed to
    `nobody`, who owns it then as any user owns their store."""
    top = tempfile.mkdtemp(prefix="smk-ro-")
    try:
        os.chmod(top, 0o755)
        os.chown(top, 65534, 65534)  # the owner's store directory
        path = os.path.join(top, "snap")
        with image.boot() as vm:
            vm.snapshot(path)
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, f) for f in files)]:
                os.chown(name, 65534, 65534)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"]
        for name in FILES:
            target = os.path.join(path, name)
            r = subprocess.run([*as_nobody, f"printf x | dd of={target} conv=notrunc 2>&1"],
                               capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode != 0 and "Permission denied" in r.stdout, (name, r.stdout)
        r = subprocess.run([*as_nobody, f"rm -r {path}"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, check=False)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(top, ignore_errors=True)
