"""The UI channel (kernel/ui_channel.py): the comm target the JupyterLab extension opens, through
a real kernel (jupyter_client). Its actions are the magics': same store entries, same text; it
pushes state only when something changed; a malformed request gets an error answer."""
from __future__ import annotations

import queue
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magics.conftest import MagicKernel, needs_vm  # noqa: E402

from supermachine_kernel.kernel import ui_channel  # noqa: E402

TARGET = ui_channel.TARGET_NAME


class Ui:
    """One supermachine.vm comm on a kernel, read from the client's IOPub channel."""

    def __init__(self, kernel: MagicKernel) -> None:
        self.k = kernel
        self.comm_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self.state: dict | None = None  # the latest state seen
        self._send("comm_open", {"comm_id": self.comm_id, "target_name": TARGET, "data": {}})

    def _send(self, msg_type: str, content: dict) -> None:
        kc = self.k.kc
        msg = kc.session.msg(msg_type, content)
        kc.shell_channel.send(msg)

    def request(self, **data) -> None:
        self._send("comm_msg", {"comm_id": self.comm_id, "data": data})

    def next(self, kind: str, timeout: float = 600, **match) -> dict:
        """The next message of ``kind`` ("state" or "result") from this comm."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.k.kc.iopub_channel.get_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["msg_type"] != "comm_msg" or msg["content"].get("comm_id") != self.comm_id:
                continue
            data = msg["content"]["data"]
            self.messages.append(data)
            if data.get("type") == "state":
                self.state = data["state"]
            if data.get("type") == kind and all(data.get(k) == v for k, v in match.items()):
                return data
        raise TimeoutError(f"no {kind} message {match} in {timeout} s; got {self.messages[-3:]}")

    def act(self, **data) -> dict:
        rid = uuid.uuid4().hex
        self.request(id=rid, **data)
        return self.next("result", id=rid)

    def fresh(self) -> dict:
        """The state now, asked for (a state pushed while a cell ran went to that cell's
        messages, which the harness drops)."""
        self.request(request="refresh")
        return self.next("state")["state"]

    def state_where(self, pred, timeout: float = 60) -> dict:
        """The latest state if ``pred`` holds for it, else the next one for which it does."""
        if self.state is not None and pred(self.state):
            return self.state
        deadline = time.monotonic() + timeout
        while True:
            state = self.next("state", timeout=max(1.0, deadline - time.monotonic()))["state"]
            if pred(state):
                return state


@pytest.fixture(scope="module")
def ui_kernel():
    with tempfile.TemporaryDirectory(prefix="smk-ui-data-") as d:
        k = MagicKernel(d, notebook="ui.ipynb")
        try:
            yield k
        finally:
            k.shutdown()


def test_magic_line_quotes_and_refuses():
    assert ui_channel.magic_line({"request": "snapshot", "name": None}) == ("snapshot", "")
    assert ui_channel.magic_line({"request": "delete", "ref": "a b; rm"}) == \
        ("snapshot", "--delete 'a b; rm'")
    assert ui_channel.magic_line({"request": "rename", "ref": "s1", "new_name": "s2"}) == \
        ("snapshot", "--rename s1 s2")
    for bad in ({"request": "shell"}, {"request": "restore"}, {"request": "restore", "ref": 7},
                {"request": "restore", "ref": "x" * 500}, {}):
        with pytest.raises(ui_channel.UiRequestError):
            ui_channel.magic_line(bad)


@needs_vm
def test_ui_actions_are_the_magics(ui_kernel):
    k = ui_kernel
    k.ok("x = 1")
    ui = Ui(k)
    state = ui.next("state")["state"]
    assert state["protocol"] == ui_channel.PROTOCOL_VERSION
    assert state["group"]["key"] == k.store().key and state["snapshots"] == []
    state = ui.state_where(lambda s: s["vm"].get("memory_total_bytes"))
    assert state["vm"]["accelerator"] in ("kvm", "tcg")
    assert 0 < state["vm"]["memory_used_bytes"] < state["vm"]["memory_total_bytes"]
    assert state["vm"]["started"] and not state["vm"]["restored"]
    assert state["dirty"]

    res = ui.act(request="snapshot", name="ui1")
    assert res["ok"], res
    assert res["output"].startswith("Snapshot 'ui1': ") and "Restore with %restore ui1" in res["output"]
    (entry,) = k.store().entries()
    assert entry.name == "ui1" and entry.repl_id is not None
    state = ui.state_where(lambda s: s["head"] == "ui1")
    assert [s["name"] for s in state["snapshots"]] == ["ui1"] and not state["dirty"]

    k.ok("x = 2")
    assert ui.fresh()["dirty"]
    res = ui.act(request="restore", ref="ui1")
    assert res["ok"] and res["output"].startswith("Restored snapshot 'ui1'"), res
    state = ui.state_where(lambda s: s["vm"].get("restored"))  # pushed, no cell ran
    assert "ui1" in state["vm"]["origin"] and not state["dirty"]
    assert k.value("x") == "1"

    res = ui.act(request="rename", ref="ui1", new_name="ui2")
    assert res["ok"] and res["output"] == "Renamed snapshot 'ui1' to 'ui2'.", res
    assert [e.name for e in k.store().entries()] == ["ui2"]
    ui.state_where(lambda s: s["head"] == "ui2" and [e["name"] for e in s["snapshots"]] == ["ui2"])
    assert "Snapshot 'ui3'" in k.ok("%snapshot ui3")  # a cell's magic shows in the UI too
    state = ui.fresh()
    assert state["head"] == "ui3"
    assert {s["name"]: s["parent"] for s in state["snapshots"]} == {"ui2": None, "ui3": "ui2"}

    res = ui.act(request="delete", ref="ui2")
    assert res["ok"] and res["output"].startswith("Deleted snapshot 'ui2'"), res
    assert [e.name for e in k.store().entries()] == ["ui3"]


@needs_vm
def test_bad_requests_get_error_answers(ui_kernel):
    ui = Ui(ui_kernel)
    ui.next("state")
    res = ui.act(request="format-disk")
    assert not res["ok"] and res["error"]["ename"] == "UiRequestError"
    res = ui.act(request="restore", ref="../../etc")
    assert not res["ok"] and res["error"]["ename"] == "SnapshotNotFound", res
    res = ui.act(request="rename", ref="nope", new_name="x")
    assert not res["ok"] and "no snapshot named 'nope'" in res["error"]["evalue"], res
    assert ui_kernel.value("1 + 1") == "2"  # the kernel carries on


@needs_vm
def test_an_idle_kernel_sends_nothing(ui_kernel):
    """Once the kernel settled (a VM restored ahead by an earlier test may still finish and
    change the pool's figures), a whole quiet window passes without a message: no per-second
    traffic, which idle culling would count as activity."""
    ui = Ui(ui_kernel)
    ui.next("state")
    deadline = time.monotonic() + 120
    while True:
        ui.messages.clear()
        try:
            ui.next("state", timeout=4 * ui_channel.POLL_INTERVAL)
        except TimeoutError:
            break
        assert time.monotonic() < deadline, "the UI channel never went quiet on an idle kernel"
    assert ui.messages == []
