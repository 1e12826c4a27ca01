"""sync.py as the kernel runs it: attached to a guest REPL (its listing and its `apply`, here
guest_side.py's functions called in this process on the guest directory; file bytes through
the real agent), the host tree watched with inotify (HostTree), `unchanged()` as the cheap check
before a cell."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from supermachine_kernel.workspace import guest_side
from supermachine_kernel.workspace.scan import EXTRA_ENTRIES, Limits
from supermachine_kernel.workspace.sync import (
    HostTree,
    WorkspaceSync,
    filesystem_type,
    watchable,
)
from supermachine_kernel.workspace.transfer import ListingError

NOW = dt.datetime(2026, 12, 6, 8, 15, 3)
LIMITS = Limits()


def listing(root: Path) -> dict:
    return guest_side.list_tree(str(root), list(LIMITS.excludes), LIMITS.exclude_hidden_dirs,
                                LIMITS.max_files + EXTRA_ENTRIES)


def attached(host: Path, guest: Path, mode: str = "sync") -> WorkspaceSync:
    ws = WorkspaceSync(host, str(guest), mode, LIMITS, watch_host=True)
    ws.attach(listing(guest), lambda ops: guest_side.apply(str(guest), ops))
    return ws


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    h = tmp_path / "host-ws"
    (h / "sub").mkdir(parents=True)
    (h / "data.csv").write_text("a,b\n1,2\n")
    (h / "sub" / "x.txt").write_text("x")
    return h


def test_a_pass_pushes_then_nothing_is_left_to_do(agent_vm, host_root: Path,
                                                  guest_root: Path) -> None:
    ws = attached(host_root, guest_root)
    assert not ws.unchanged()
    assert ws.before_cell(agent_vm, NOW) == ""
    assert (guest_root / "sub" / "x.txt").read_text() == "x"
    assert ws.clean          # the push did all it planned: the REPL may drop its dirty flag
    # The REPL's listing was brought up to date by the push: it agrees with a fresh one.
    fresh = WorkspaceSync(host_root, str(guest_root), "sync", LIMITS)
    fresh.attach(listing(guest_root), lambda ops: {"failed": []})
    assert ws.guest is not None and fresh.guest is not None
    assert {p: e.signature() for p, e in ws.guest.entries.items()} == \
        {p: e.signature() for p, e in fresh.guest.entries.items()}
    # The first scan set up the host watch, and a change before it costs one more pass.
    assert ws.before_cell(agent_vm, NOW) == ""
    assert ws.unchanged()


def test_a_host_change_ends_unchanged(agent_vm, host_root: Path, guest_root: Path) -> None:
    ws = attached(host_root, guest_root)
    ws.before_cell(agent_vm, NOW)
    ws.before_cell(agent_vm, NOW)
    assert ws.unchanged()
    (host_root / "sub" / "x.txt").write_text("changed")
    assert not ws.unchanged()
    assert not ws.unchanged()        # stays due until a pass scanned
    ws.before_cell(agent_vm, NOW)
    assert (guest_root / "sub" / "x.txt").read_text() == "changed"
    os.mkdir(host_root / "new")
    (host_root / "new" / "y.txt").write_text("y")
    assert not ws.unchanged()
    ws.before_cell(agent_vm, NOW)
    assert (guest_root / "new" / "y.txt").read_text() == "y"


def test_after_a_cell_only_a_listing_brings_changes_back(agent_vm, host_root: Path,
                                                         guest_root: Path) -> None:
    ws = attached(host_root, guest_root)
    ws.before_cell(agent_vm, NOW)
    (guest_root / "out.txt").write_text("result")
    assert ws.after_cell(agent_vm, NOW, listing=None) == ""      # the REPL saw no change
    assert not (host_root / "out.txt").exists()
    assert ws.after_cell(agent_vm, NOW, listing=listing(guest_root)) == ""
    assert (host_root / "out.txt").read_text() == "result"
    assert not ws.unchanged()     # a listing came: the next before_cell plans again
    assert ws.before_cell(agent_vm, NOW) == ""
    assert sorted(os.listdir(guest_root)) == ["data.csv", "out.txt", "sub"]


def test_a_missing_or_forged_listing_syncs_nothing(agent_vm, host_root: Path,
                                                   guest_root: Path) -> None:
    ws = attached(host_root, guest_root)
    ws.before_cell(agent_vm, NOW)
    gone = {"error": "the workspace directory /workspace is gone"}
    assert "not synced this time: the workspace directory /workspace is gone" in \
        ws.after_cell(agent_vm, NOW, listing=gone)
    assert "not synced" in ws.after_cell(agent_vm, NOW, listing={"v": 2})
    assert sorted(os.listdir(host_root)) == ["data.csv", "sub"]     # nothing deleted
    with pytest.raises(ListingError):
        ws.attach(["not", "a", "listing"], lambda ops: {"failed": []})


def test_read_only_never_writes_the_host(agent_vm, host_root: Path, guest_root: Path) -> None:
    ws = attached(host_root, guest_root, "read-only")
    ws.before_cell(agent_vm, NOW)
    (guest_root / "out.txt").write_text("result")
    assert ws.after_cell(agent_vm, NOW, listing=listing(guest_root)) == ""
    assert sorted(os.listdir(host_root)) == ["data.csv", "sub"]


def test_host_tree_without_a_watch_scans_every_time(host_root: Path) -> None:
    tree = HostTree(str(host_root), LIMITS, watch=False)
    first = tree.scan()
    assert tree.may_have_changed()
    (host_root / "data.csv").write_text("a,b\n1,2\n3,4\n")
    assert tree.scan().entries["data.csv"].size != first.entries["data.csv"].size


def test_the_filesystem_type_of_a_path() -> None:
    assert filesystem_type("/proc/self") == "proc"
    assert watchable("/proc/self")
