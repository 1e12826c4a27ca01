"""%snapshots and the store behind it: table (HTML + text), lineage, sizes, per-notebook folders,
the group of a kernel outside Jupyter Server, other groups reached as GROUP/NAME."""
from __future__ import annotations

import json
import os

import pytest

from supermachine_kernel.machine.snapshot_store import (
    NotebookSnapshot,
    SnapshotStore,
    StoreError,
    disk_usage,
    kernel_id,
    notebook_key,
)


def _fake_snapshot(nb, name: str, created_ms: int = 1_700_000_000_000, data: bytes = b"x") -> str:
    path = nb.path(name)
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"created_unix_ms": created_ms, "kind": "full"}, f)
    with open(os.path.join(path, "state"), "wb") as f:
        f.write(data)
    return path


# -- the store (no kernel) -------------------------------------------------------------------


def test_notebook_keys_follow_the_notebook_path(tmp_path):
    a, label = notebook_key({"JPY_SESSION_NAME": "work/a.ipynb"}, "/home/u/work", "k1", "s")
    assert a.startswith("a-") and label == "/home/u/work/a.ipynb"
    # the same notebook from another kernel (or after a restart) → the same folder
    assert notebook_key({"JPY_SESSION_NAME": "work/a.ipynb"}, "/home/u/work", "k2", "t")[0] == a
    # another notebook, or the same name elsewhere → another folder
    assert notebook_key({"JPY_SESSION_NAME": "b.ipynb"}, "/home/u/work", "k1", "s")[0] != a
    assert notebook_key({"JPY_SESSION_NAME": "work/a.ipynb"}, "/home/v/work", "k1", "s")[0] != a
    # unknown notebook: the kernel id, else the session id; nothing can escape the root
    assert notebook_key({}, "/x", "1234-abcd", "s")[0] == "kernel-1234-abcd"
    assert notebook_key({}, "/x", None, "../../etc")[0].startswith("session-")
    assert "/" not in notebook_key({"JPY_SESSION_NAME": "../../x/../y.ipynb"}, "/x", None, "")[0]


def test_kernel_id_is_the_connection_files_across_restarts(tmp_path):
    # Jupyter Server (MultiKernelManager): kernel-<kernel id>.json → the kernel id itself.
    uid = "0b6e2c4a-1f2d-4c5e-9a8b-7c6d5e4f3a2b"
    assert kernel_id(f"/run/jupyter/kernel-{uid}.json", b"k") == uid
    # A plain KernelManager (nbclient, papermill): a temporary name; jupyter console:
    # kernel-<its pid>.json. The manager keeps the file and its key across restarts, so the
    # same (path, key) is the same kernel; a later kernel reusing the name has another key.
    tmp = str(tmp_path / "tmpa1b2c3d4.json")
    first = kernel_id(tmp, b"key-1")
    assert first == kernel_id(tmp, b"key-1") and first.startswith("tmpa1b2c3d4-")
    assert kernel_id(tmp, b"key-2") != first
    assert kernel_id(str(tmp_path / "tmpzzz.json"), b"key-1") != first
    console = kernel_id(str(tmp_path / "kernel-4242.json"), b"")
    assert console.startswith("4242-") and "/" not in console
    assert kernel_id("", b"key") is None and kernel_id(None) is None
    key, label = notebook_key({}, "/home/u/proj", first, "session-changes-every-start")
    assert key == f"kernel-{first}" and "/home/u/proj" in label


def test_sizes_are_disk_usage_of_sparse_files(tmp_path):
    sparse = tmp_path / "memory"
    with open(sparse, "wb") as f:
        f.truncate(256 << 20)
        f.seek(8 << 20)
        f.write(b"\1" * (1 << 20))
    used = disk_usage(str(tmp_path))
    assert (1 << 20) <= used < (4 << 20)  # 1 MiB of data, not the 256 MiB length


def test_index_listing_names_and_delete(tmp_path):
    store = SnapshotStore(str(tmp_path))
    nb = store.notebook("nb-1", "/n/nb.ipynb")
    other = store.notebook("nb-2", "/n/other.ipynb")
    assert nb.entries() == [] and nb.new_name() == "snap-1"
    with pytest.raises(StoreError, match="no snapshots yet"):
        nb.latest()
    _fake_snapshot(nb, "snap-1", 1_000)
    nb.record(NotebookSnapshot(name="snap-1", created=1.0, parent=None, repl_id=7))
    _fake_snapshot(nb, "later", 5_000)  # no index entry: listed from its metadata.json
    _fake_snapshot(other, "theirs")
    assert [e.name for e in nb.entries()] == ["snap-1", "later"]
    assert nb.latest().name == "later" and nb.get("snap-1").repl_id == 7
    assert nb.new_name() == "snap-2"
    with pytest.raises(StoreError, match="available: snap-1, later"):
        nb.get("theirs")  # another notebook's snapshot is not visible here
    with pytest.raises(StoreError, match="invalid snapshot name"):
        nb.get("../nb-2/theirs")
    with pytest.raises(StoreError, match="already exists"):
        nb.reserve("later")
    assert nb.delete("later") > 0
    assert [e.name for e in nb.entries()] == ["snap-1"]
    assert [e.name for e in other.entries()] == ["theirs"]
    rows = {key: count for key, _, count, _ in store.notebooks()}
    assert rows == {"nb-1": 1, "nb-2": 1}


def test_other_groups_are_reached_only_as_group_slash_name(tmp_path):
    store = SnapshotStore(str(tmp_path))
    own = store.notebook("kernel-own", "kernel own")
    other = store.notebook("kernel-old", "kernel old, started in /p (notebook path unknown)")
    _fake_snapshot(other, "s1", 1_000)
    other.record(NotebookSnapshot(name="s1", created=1.0, repl_id=3))
    _fake_snapshot(other, "s2", 2_000)
    # This notebook has none: the message says where the others are and how to name them.
    with pytest.raises(StoreError, match=r"this notebook has no snapshots yet.*%snapshots --all"):
        store.resolve(own, None)
    with pytest.raises(StoreError, match=r"no snapshot named 's1'.*%restore GROUP/NAME"):
        store.resolve(own, "s1")
    group, entry = store.resolve(own, "kernel-old/s1")
    assert group.foreign and group.label.startswith("kernel old") and group.dir == other.dir
    assert entry.ref == "kernel-old/s1" and entry.repl_id == 3
    assert store.resolve(own, "kernel-old/")[1].ref == "kernel-old/s2"  # its latest
    with pytest.raises(StoreError, match="available: kernel-old/s1, kernel-old/s2"):
        store.resolve(own, "kernel-old/nope")
    with pytest.raises(StoreError, match="no snapshot group 'kernel-gone'.*%snapshots --all"):
        store.resolve(own, "kernel-gone/s1")
    for bad in ("../kernel-old/s1", "kernel-old/../x", "/s1"):
        with pytest.raises(StoreError, match="invalid"):
            store.resolve(own, bad)
    # Naming the own group explicitly is the same as a plain name; its entries stay plain.
    _fake_snapshot(own, "mine")
    group, entry = store.resolve(own, "kernel-own/mine")
    assert group is own and entry.ref == "mine"
    assert [g.key for g in store.groups(own)] == ["kernel-old", "kernel-own"]
    assert store.groups(own)[1] is own
    # The group of an entry is never written into an index.
    other.record(NotebookSnapshot(name="s2", created=2.0, group="kernel-old"))
    index = json.loads((tmp_path / "kernel-old" / "index.json").read_text())
    assert "group" not in index["snapshots"]["s2"]
    assert other.delete("s1") > 0 and [e.name for e in other.entries()] == ["s2"]


def test_damaged_index_is_rebuilt_from_directories(tmp_path):
    nb = SnapshotStore(str(tmp_path)).notebook("nb", "nb")
    _fake_snapshot(nb, "a")
    with open(os.path.join(nb.dir, "index.json"), "w") as f:
        f.write("{not json")
    assert [e.name for e in nb.entries()] == ["a"]
    nb.record(NotebookSnapshot(name="a", created=2.0, parent="zero"))
    assert nb.get("a").parent == "zero"


# -- the magic (real kernel) -----------------------------------------------------------------


def test_table_html_and_text_with_lineage(kernel):
    reply, outputs = kernel.execute("%snapshots")
    assert reply["status"] == "ok"
    assert "No snapshots for this notebook yet" in "".join(
        m["content"].get("text", "") for m in outputs)

    kernel.ok("%snapshot first")
    kernel.ok("%snapshot second")   # parent: first (the session's state came from it)
    kernel.ok("%restore first")
    kernel.ok("%snapshot branch")   # parent: first again (restored), not second
    reply, outputs = kernel.execute("%snapshots")
    (shown,) = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
    text, html = shown["text/plain"], shown["text/html"]
    lines = text.splitlines()
    assert lines[0] == f"Group {kernel.store().key}: {kernel.store().label}"
    assert lines[1].split() == ["name", "created", "size", "parent"]
    rows = {ln.split()[0].lstrip("*"): ln.split() for ln in lines[3:6]}
    assert set(rows) == {"first", "second", "branch"}
    assert rows["first"][-1] == "-"
    assert rows["second"][-1] == "first" and rows["branch"][-1] == "first"
    assert lines[5].startswith("*branch")  # the running session's origin
    assert "MiB" in text and "3 snapshot(s)" in text
    assert "<table" in html and "<td" in html and "branch" in html and "<th>parent</th>" in html
    index = kernel.store().entries()
    assert {e.name: e.parent for e in index} == {"first": None, "second": "first",
                                                 "branch": "first"}
