"""The guest REPL's workspace (guest/repl.py Workspace), driven on the host: attach makes and
enters the directory, a listing goes into the execute reply only after a change, a vanished
directory is an error (never an empty listing), the lineage counts executes."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supermachine_kernel.workspace.transfer import GUEST_SOURCE


@pytest.fixture
def ws(repl, tmp_path: Path) -> Iterator[object]:
    cwd = os.getcwd()
    w = repl.Workspace()
    yield w
    os.chdir(cwd)
    if w.watcher is not None:
        w.watcher.close()


def attach(ws, root: Path, send_back: bool = True) -> dict:
    return ws.attach({"source": GUEST_SOURCE, "root": str(root), "excludes": [".git"],
                      "hidden": True, "max_entries": 100, "send_back": send_back})


def test_attach_makes_and_enters_the_directory_and_lists_it(ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    answer = attach(ws, root)
    assert answer["root"] == str(root) and os.getcwd() == str(root)
    assert answer["listing"] == {"v": 1, "entries": [], "unlisted": 0}
    assert isinstance(answer["token"], str) and answer["seq"] == 0


def test_a_listing_only_after_a_change(ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    attach(ws, root)
    reply: dict = {}
    ws.before_cell({})
    ws.after_cell(reply)
    assert "workspace" not in reply
    (root / "out.txt").write_text("x")
    ws.after_cell(reply)
    assert [e[0] for e in reply["workspace"]["entries"]] == ["out.txt"]
    reply = {}
    (root / ".git").mkdir()
    ws.after_cell(reply)
    assert "workspace" not in reply          # excluded names do not count as changes


def test_the_push_marks_its_own_writes_clean(ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    attach(ws, root)
    (root / "pushed.csv").write_text("a,b")
    ws.before_cell({"workspace_clean": True})
    reply: dict = {}
    ws.after_cell(reply)
    assert "workspace" not in reply


def test_a_vanished_directory_is_an_error_not_an_empty_listing(ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    attach(ws, root)
    os.chdir(tmp_path)
    os.rmdir(root)
    reply: dict = {}
    ws.after_cell(reply)
    assert "gone" in reply["workspace"]["error"]


def test_an_unwritable_root_falls_back_to_home(repl, ws, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    answer = attach(ws, blocked / "workspace")
    assert answer["root"] == str(tmp_path / "home" / "workspace")
    assert os.getcwd() == answer["root"]


def test_the_lineage_counts_executes_and_survives_a_second_attach(ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    first = attach(ws, root)
    ws.before_cell({})
    ws.before_cell({})
    again = attach(ws, root)
    assert (again["token"], again["seq"]) == (first["token"], 2)


def test_apply_and_unknown_ops(repl, ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    with pytest.raises(ValueError):
        ws.apply({"ops": {"mkdir": ["x"]}})        # not attached yet
    attach(ws, root)
    assert ws.apply({"ops": {"mkdir": ["a/b"]}}) == {"status": "ok", "failed": []}
    assert (root / "a" / "b").is_dir()
    driver = repl.Driver.__new__(repl.Driver)
    driver.workspace = ws
    with pytest.raises(ValueError):
        driver.do_workspace({"op": "format-disk"})


def test_read_only_sends_no_listing_back(ws, tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    attach(ws, root, send_back=False)
    (root / "out.txt").write_text("x")
    reply: dict = {}
    ws.after_cell(reply)
    assert "workspace" not in reply
