"""Comms both ways: ipywidgets created in the guest render and sync; frontend-opened comms work."""
from __future__ import annotations

import queue
import time

from .harness import SLOW


def _iopub_until(k, predicate, timeout=20):
    deadline = time.monotonic() + timeout * SLOW
    seen = []
    while time.monotonic() < deadline:
        try:
            msg = k.kc.iopub_channel.get_msg(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(msg)
        if predicate(msg):
            return msg
    raise AssertionError(f"no matching iopub message; saw {[m['msg_type'] for m in seen]}")


def _send_shell(k, msg_type, content, buffers=None):
    msg = k.kc.session.msg(msg_type, content)
    k.kc.shell_channel.send(msg) if buffers is None else k.kc.session.send(
        k.kc.shell_channel.socket, msg, buffers=buffers)
    return msg


def test_widget_renders_and_syncs_both_ways(kernel):
    reply, outputs = kernel.execute(
        "import ipywidgets as w\nslider = w.IntSlider(value=3, description='n')\nslider",
        timeout=60)
    assert reply["status"] == "ok", reply
    opens = [m for m in outputs if m["msg_type"] == "comm_open"]
    assert opens, [m["msg_type"] for m in outputs]
    slider_open = [m for m in opens if m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"]
    assert len(slider_open) == 1
    assert slider_open[0]["content"]["target_name"] == "jupyter.widget"
    comm_id = slider_open[0]["content"]["comm_id"]
    assert slider_open[0]["content"]["data"]["state"]["value"] == 3
    views = [m for m in outputs if m["msg_type"] in ("execute_result", "display_data")
             and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
    assert views and views[0]["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == comm_id

    # frontend -> guest: the user drags the slider
    _send_shell(kernel, "comm_msg", {"comm_id": comm_id,
                                     "data": {"method": "update", "state": {"value": 7},
                                              "buffer_paths": []}})
    assert kernel.value("slider.value") == "7"

    # guest -> frontend: code changes the value
    reply, outputs = kernel.execute("slider.value = 11")
    updates = [m for m in outputs if m["msg_type"] == "comm_msg"
               and m["content"]["comm_id"] == comm_id]
    assert updates and updates[-1]["content"]["data"]["state"]["value"] == 11


def test_widget_callback_output(kernel):
    reply, _ = kernel.execute(
        "import ipywidgets as w\nbtn_log = []\nb = w.Button()\n"
        "b.on_click(lambda _: (btn_log.append(1), print('clicked')))\nb.model_id", timeout=60)
    assert reply["status"] == "ok"
    model_id = kernel.value("b.model_id").strip("'")
    kernel.flush()
    _send_shell(kernel, "comm_msg", {"comm_id": model_id,
                                     "data": {"method": "custom", "content": {"event": "click"}}})
    _iopub_until(kernel, lambda m: m["msg_type"] == "stream" and "clicked" in m["content"]["text"])
    assert kernel.value("len(btn_log)") == "1"


def test_frontend_opened_comm_echo(kernel):
    reply, _ = kernel.execute(
        "import comm\n"
        "def _target(c, msg):\n"
        "    c.send({'opened_with': msg['content']['data']})\n"
        "    c.on_msg(lambda m: c.send({'echo': m['content']['data']}, buffers=m['buffers']))\n"
        "comm.get_comm_manager().register_target('echo', _target)\n")
    assert reply["status"] == "ok", reply
    kernel.flush()
    _send_shell(kernel, "comm_open", {"comm_id": "c-1", "target_name": "echo", "data": {"x": 1}})
    msg = _iopub_until(kernel, lambda m: m["msg_type"] == "comm_msg")
    assert msg["content"] == {"comm_id": "c-1", "data": {"opened_with": {"x": 1}}}

    _send_shell(kernel, "comm_msg", {"comm_id": "c-1", "data": {"y": 2}}, buffers=[b"\x00\x01\xff"])
    msg = _iopub_until(kernel, lambda m: m["msg_type"] == "comm_msg")
    assert msg["content"]["data"] == {"echo": {"y": 2}}
    assert [bytes(b) for b in msg["buffers"]] == [b"\x00\x01\xff"]

    info = kernel.kc.comm_info(target_name="echo")
    reply = kernel.kc.get_shell_msg(timeout=10 * SLOW)
    while reply["parent_header"].get("msg_id") != info:
        reply = kernel.kc.get_shell_msg(timeout=10 * SLOW)
    assert "c-1" in reply["content"]["comms"]

    _send_shell(kernel, "comm_close", {"comm_id": "c-1", "data": {}})
    info = kernel.kc.comm_info(target_name="echo")
    reply = kernel.kc.get_shell_msg(timeout=10 * SLOW)
    while reply["parent_header"].get("msg_id") != info:
        reply = kernel.kc.get_shell_msg(timeout=10 * SLOW)
    assert "c-1" not in reply["content"]["comms"]


def test_comm_open_to_unknown_target_is_closed(kernel):
    kernel.flush()
    _send_shell(kernel, "comm_open", {"comm_id": "c-2", "target_name": "nobody-home", "data": {}})
    msg = _iopub_until(kernel, lambda m: m["msg_type"] == "comm_close")
    assert msg["content"]["comm_id"] == "c-2"


def test_output_widget_captures_by_parent_msg_id(kernel):
    """ipywidgets.Output learns the current request's msg_id from the guest (KernelShim), so
    frontends route the output into the widget."""
    reply, _ = kernel.execute("import ipywidgets as w\nout = w.Output()\nout", timeout=60)
    assert reply["status"] == "ok"
    msg_id = kernel.kc.execute("with out:\n    print('inside')")
    seen = []
    deadline = time.monotonic() + 30 * SLOW
    while time.monotonic() < deadline:
        try:
            msg = kernel.kc.iopub_channel.get_msg(timeout=0.1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    updates = [m["content"]["data"]["state"]["msg_id"] for m in seen
               if m["msg_type"] == "comm_msg" and "msg_id" in m["content"]["data"].get("state", {})]
    assert msg_id in updates, [m["msg_type"] for m in seen]
    assert "" in updates  # and cleared on leaving the context
    assert any(m["msg_type"] == "stream" and "inside" in m["content"]["text"] for m in seen)


def test_tqdm_style_notebook_detection(kernel):
    assert kernel.value("'IPKernelApp' in get_ipython().config") == "True"
