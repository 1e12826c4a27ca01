"""kernel/workspace_hook.py without a VM: a fake kernel and guest, to pin down what reaches the
guest and the cell in the cases real kernels rarely show (mode off, a REPL from a snapshot
older than the workspace sync, a hostile attach answer)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from supermachine_kernel.kernel.workspace_hook import OLD_REPL_NOTE, WorkspaceHook
from supermachine_kernel.workspace.scan import Limits


class FakeGuest:
    def __init__(self, answer: dict) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict]] = []
        self.handle = type("Handle", (), {"vm": object()})()
        self.loop = asyncio.get_event_loop()

    async def wait_ready(self) -> None:
        return None

    async def request(self, kind: str, **fields: Any) -> dict:
        self.requests.append((kind, fields))
        return self.answer


class FakeKernel:
    def __init__(self, mode: str, guest: FakeGuest) -> None:
        self.workspace = mode
        self.guest = guest
        self.published: list[dict] = []
        self.iopub = type("Iopub", (), {"publish": lambda _, kind, c: self.published.append(c)})()
        self.log = type("Log", (), {"info": lambda *a: None})()

    def workspace_limits(self) -> Limits:
        return Limits()


def cell(hook: WorkspaceHook, reply: dict) -> tuple[dict, list[dict]]:
    sent: list[dict] = []

    async def run(**extra: Any) -> dict:
        sent.append(extra)
        return dict(reply)

    return asyncio.run(hook.around_cell(run, False)), sent


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    asyncio.set_event_loop(asyncio.new_event_loop())


def test_off_sends_nothing_and_drops_a_forged_listing() -> None:
    guest = FakeGuest({})
    hook = WorkspaceHook(FakeKernel("off", guest))
    reply, sent = cell(hook, {"status": "ok", "workspace": {"v": 1, "entries": []}})
    assert reply == {"status": "ok"} and sent == [{}] and guest.requests == []


def test_a_repl_without_a_workspace_is_said_once() -> None:
    guest = FakeGuest({"status": "error", "ename": "ValueError",
                       "evalue": "unknown request 'workspace'"})
    kernel = FakeKernel("sync", guest)
    hook = WorkspaceHook(kernel)
    cell(hook, {"status": "ok"})
    cell(hook, {"status": "ok"})
    assert [p["text"] for p in kernel.published] == [OLD_REPL_NOTE + "\n"]
    assert len(guest.requests) == 1


@pytest.mark.parametrize("root", ["relative", "/a\0b", "/" + "x" * 5000, 7])
def test_a_bad_root_in_the_attach_answer_syncs_nothing(root: Any) -> None:
    guest = FakeGuest({"status": "ok", "root": root, "listing": {"v": 1, "entries": []},
                       "token": "t", "seq": 0})
    kernel = FakeKernel("sync", guest)
    hook = WorkspaceHook(kernel)
    reply, sent = cell(hook, {"status": "ok"})
    assert sent == [{}]
    assert "no usable workspace directory" in kernel.published[0]["text"]
