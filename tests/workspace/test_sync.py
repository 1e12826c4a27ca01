"""sync.py: the two passes around a cell, with the real agent on a unix socket."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from supermachine_kernel.workspace.scan import Limits
from supermachine_kernel.workspace.sync import WorkspaceSync

NOW = dt.datetime(2026, 12, 6, 8, 15, 3)


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    h = tmp_path / "host-ws"
    h.mkdir()
    (h / "data.csv").write_text("a,b\n1,2\n")
    with open(h / "huge.bin", "wb") as f:
        f.truncate(10 * 1000 ** 3)
    return h


def test_cells_see_the_workspace_and_their_files_come_back(agent_vm, host_root: Path,
                                                           guest_root: Path) -> None:
    ws = WorkspaceSync(host_root, str(guest_root), "sync", Limits(max_file_bytes=1000 ** 3))
    msg = ws.before_cell(agent_vm, NOW)
    assert (guest_root / "data.csv").read_text() == "a,b\n1,2\n"
    assert not (guest_root / "huge.bin").exists()
    assert msg.startswith("1 file was not copied to the VM: huge.bin is 10 GB (limit 1 GB")
    assert ws.after_cell(agent_vm, NOW) == ""
    # The cell writes a result and deletes the input.
    (guest_root / "out.txt").write_text("result")
    (guest_root / "data.csv").unlink()
    assert ws.after_cell(agent_vm, NOW) == ""
    assert (host_root / "out.txt").read_text() == "result"
    assert not (host_root / "data.csv").exists()
    # The next cell: nothing changed, nothing said (the size cap was reported once).
    assert ws.before_cell(agent_vm, NOW) == "" and ws.after_cell(agent_vm, NOW) == ""
    assert sorted(os.listdir(guest_root)) == ["out.txt"]


def test_conflict_before_a_cell(agent_vm, host_root: Path, guest_root: Path) -> None:
    ws = WorkspaceSync(host_root, str(guest_root), "sync", Limits(max_file_bytes=1000))
    ws.before_cell(agent_vm, NOW)
    (guest_root / "data.csv").write_text("guest's edit, not yet synced")
    (host_root / "data.csv").write_text("host's edit")
    msg = ws.before_cell(agent_vm, NOW)
    assert "data.csv -> data (guest copy 2026-12-06 081503).csv" in msg
    assert (host_root / "data.csv").read_text() == "host's edit"
    assert (host_root / "data (guest copy 2026-12-06 081503).csv").read_text() == \
        "guest's edit, not yet synced"
    assert (guest_root / "data.csv").read_text() == "host's edit"


def test_guest_symlink_out_is_reported_and_never_reaches_the_host(agent_vm, host_root: Path,
                                                                  guest_root: Path) -> None:
    ws = WorkspaceSync(host_root, str(guest_root), "sync", Limits(max_file_bytes=1000))
    ws.before_cell(agent_vm, NOW)
    (guest_root / "passwd").symlink_to("/etc/passwd")
    msg = ws.after_cell(agent_vm, NOW)
    assert msg == "1 file was not copied from the VM to the workspace: passwd is a symbolic " \
                  "link (links are never synced)."
    assert not os.path.lexists(host_root / "passwd")


def test_read_only_and_off(agent_vm, host_root: Path, guest_root: Path) -> None:
    ro = WorkspaceSync(host_root, str(guest_root), "read-only", Limits(max_file_bytes=1000))
    ro.before_cell(agent_vm, NOW)
    assert (guest_root / "data.csv").exists()
    (guest_root / "out.txt").write_text("x")
    assert ro.after_cell(agent_vm, NOW) == ""
    assert not (host_root / "out.txt").exists()
    off = WorkspaceSync(host_root, str(guest_root / "other"), "off", Limits())
    assert off.before_cell(agent_vm, NOW) == "" and not (guest_root / "other").exists()
    with pytest.raises(ValueError):
        WorkspaceSync(host_root, "/x", "both", Limits())


def test_a_kind_clash_is_left_alone_and_reported_once(agent_vm, host_root: Path,
                                                       guest_root: Path) -> None:
    ws = WorkspaceSync(host_root, str(guest_root), "sync", Limits(max_file_bytes=1000))
    ws.before_cell(agent_vm, NOW)
    (host_root / "results").mkdir()
    (guest_root / "results").write_text("a file in the guest")
    assert "left alone (rename one of them): results." in ws.after_cell(agent_vm, NOW)
    assert (host_root / "results").is_dir()
    assert (guest_root / "results").read_text() == "a file in the guest"
    assert ws.before_cell(agent_vm, NOW) == ""


def test_after_a_restore_nothing_on_the_host_is_lost(agent_vm, host_root: Path,
                                                      guest_root: Path) -> None:
    ws = WorkspaceSync(host_root, str(guest_root), "sync", Limits(max_file_bytes=1000))
    ws.before_cell(agent_vm, NOW)
    (guest_root / "model.txt").write_text("v1")
    ws.after_cell(agent_vm, NOW)
    # A snapshot would hold this guest tree. Then the user goes on...
    (guest_root / "model.txt").write_text("v2, a later cell")
    ws.after_cell(agent_vm, NOW)
    assert (host_root / "model.txt").read_text() == "v2, a later cell"
    # ...and %restore puts back the snapshot's guest tree (model.txt "v1", other mtime).
    (guest_root / "model.txt").write_text("v1")
    os.utime(guest_root / "model.txt", ns=(1, 1))
    ws.forget()
    msg = ws.before_cell(agent_vm, NOW)
    assert "model.txt -> model (guest copy 2026-12-06 081503).txt" in msg
    assert (host_root / "model.txt").read_text() == "v2, a later cell"
    assert (host_root / "model (guest copy 2026-12-06 081503).txt").read_text() == "v1"
    assert (guest_root / "model.txt").read_text() == "v2, a later cell"
    # data.csv was equal on both sides: not a conflict, not copied again.
    assert "data.csv" not in msg


def test_a_tree_past_the_file_cap_is_reported_once(agent_vm, host_root: Path,
                                                   guest_root: Path) -> None:
    """A kernel started in a big directory: the cap's sentence comes with the first cell only,
    not again with every pass over the same tree (each pass counts its unlisted entries)."""
    for i in range(1100):  # past the scan's ceiling (max_files + 1000): some go unlisted
        (host_root / f"f{i:04}.txt").write_text(str(i))
    ws = WorkspaceSync(host_root, str(guest_root), "sync",
                       Limits(max_file_bytes=1000, max_files=10), watch_host=False)
    assert "1092 files were not copied to the VM" in ws.before_cell(agent_vm, NOW)
    ws.after_cell(agent_vm, NOW)
    (host_root / "f0000.txt").write_text("changed")  # a later pass over the same big tree
    assert ws.before_cell(agent_vm, NOW) == ""
    assert (guest_root / "f0000.txt").read_text() == "changed"
