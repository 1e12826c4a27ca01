"""%pool: a host-side ipywidgets HTML widget with live pool stats, observed on a real client."""
from __future__ import annotations

import queue
import re
import time

import pytest

from supermachine_kernel.magics import widget

VIEW = "application/vnd.jupyter.widget-view+json"


def test_widget_state_matches_ipywidgets():
    ipywidgets = pytest.importorskip("ipywidgets")
    h = ipywidgets.HTML(value="x")
    ours = widget.html_state("x", "L", "S")
    theirs = h.get_state()
    assert set(ours) == set(theirs)
    for key in ("_model_module", "_model_module_version", "_model_name", "_view_module",
                "_view_module_version", "_view_name"):
        assert ours[key] == theirs[key]
    assert widget.layout_state() == dict(h.layout.get_state())
    assert widget.html_style_state() == dict(h.style.get_state())
    assert widget.PROTOCOL_VERSION == ipywidgets.__protocol_version__


def _iopub(k, seconds: float) -> list[dict]:
    msgs, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msgs.append(k.kc.iopub_channel.get_msg(timeout=0.1))
        except queue.Empty:
            pass
    return msgs


def test_pool_widget_opens_displays_and_updates(kernel):
    seen: list[dict] = []
    reply, outputs = kernel.execute("%pool", on_iopub=seen.append)
    assert reply["status"] == "ok"
    opens = [m for m in seen if m["msg_type"] == "comm_open"]
    assert len(opens) == 3 and all(m["content"]["target_name"] == "jupyter.widget" for m in opens)
    assert all(m["metadata"]["version"] == "2.1.0" for m in opens)
    models = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in opens}
    (html_id,) = [cid for cid, s in models.items() if s["_model_name"] == "HTMLModel"]
    state = models[html_id]
    assert state["_model_module"] == "@jupyter-widgets/controls"
    assert state["layout"][len("IPY_MODEL_"):] in models
    for label in ("alive", "in_use", "idle", "waiting", "min", "max", "accelerator",
                  "recent pool acquires", "recent pool restores"):
        assert label in state["value"]
    (shown,) = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
    assert shown[VIEW]["model_id"] == html_id and "pool:" in shown["text/plain"]

    # An idle kernel sends no update (idle culling must see it idle); a change of the figures
    # arrives on its own.
    assert not [m for m in _iopub(kernel, 2.5) if m["msg_type"] == "comm_msg"
                and m["content"]["comm_id"] == html_id]
    msg_id = kernel.kc.execute("%snapshot")  # its figure changes the widget
    seen_after: list[dict] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(
            m["msg_type"] == "status" and m["parent_header"].get("msg_id") == msg_id
            and m["content"]["execution_state"] == "idle" for m in seen_after):
        seen_after += _iopub(kernel, 1)
    seen_after += _iopub(kernel, 2.5)
    updates = [m for m in seen_after if m["msg_type"] == "comm_msg"
               and m["content"]["comm_id"] == html_id]
    assert updates and updates[0]["content"]["data"]["method"] == "update"
    value = updates[-1]["content"]["data"]["state"]["value"]
    assert "recent %snapshot" in value and re.search(r"recent %snapshot</td><td>\d+ ms", value)

    # Frontend → kernel messages for the widget are answered by the host, not the guest.
    kernel.kc.comm_info(target_name="jupyter.widget")
    info = kernel.kc.shell_channel.get_msg(timeout=30)
    while info["msg_type"] != "comm_info_reply":
        info = kernel.kc.shell_channel.get_msg(timeout=30)
    assert html_id in info["content"]["comms"]
    msg = kernel.kc.session.msg("comm_msg", {"comm_id": html_id, "data": {"method": "request_state"}})
    kernel.kc.shell_channel.send(msg)
    replies = [m for m in _iopub(kernel, 3) if m["msg_type"] == "comm_msg"
               and m["parent_header"].get("msg_id") == msg["header"]["msg_id"]]
    assert [m["content"]["comm_id"] for m in replies] == [html_id]
    assert set(replies[0]["content"]["data"]["state"]) == set(state)
    kernel.kc.shell_channel.send(kernel.kc.session.msg("comm_close", {"comm_id": html_id,
                                                                      "data": {}}))
    time.sleep(1.5)
    _iopub(kernel, 0.5)
    assert not [m for m in _iopub(kernel, 2.5) if m["msg_type"] == "comm_msg"
                and m["content"]["comm_id"] == html_id]
    assert kernel.value("1 + 1") == "2"


def test_pool_text(kernel):
    out = kernel.ok("%pool --text")
    assert "pool:" in out and "accelerator:" in out
