"""The comm router without a kernel process: which comm messages reach the guest, which the host
widgets answer, and what comm_info lists (the VM-backed comm tests are test_comms.py and
test_comm_requests.py; the %pool widget end to end is tests/magics/test_pool.py)."""
from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from supermachine_kernel.kernel.comms import CommRouter


class FakeKernel:
    log = logging.getLogger("test_comm_router")


class FakeIopub:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict, dict | None]] = []
        self.last_parent: dict = {}

    def publish(self, msg_type: str, content: dict, *, parent: dict | None = None,
                **kw: Any) -> None:
        self.published.append((msg_type, content, parent))


class FakeCalls:
    """Records what would be sent to the guest; answers with `reply`."""

    def __init__(self, reply: dict) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.reply = reply

    async def request(self, guest: Any, kind: str, parent: dict, /, **fields: Any) -> dict:
        self.sent.append((kind, fields))
        return self.reply


class FakeGuest:
    alive = True


def _router(reply: dict | None = None) -> tuple[CommRouter, FakeIopub, FakeCalls]:
    iopub, calls = FakeIopub(), FakeCalls(reply or {"status": "ok"})
    return CommRouter(FakeKernel(), iopub, calls), iopub, calls  # type: ignore[arg-type]


def _request(msg_type: str, content: dict, buffers: list[bytes] = ()) -> dict:
    return {"header": {"msg_id": "m1", "msg_type": msg_type, "session": "s"},
            "content": content, "metadata": {"version": "2.1.0"}, "buffers": list(buffers)}


def test_comm_messages_go_to_the_guest_with_their_buffers():
    router, iopub, calls = _router()
    parent = _request("comm_msg", {"comm_id": "c1", "data": {"x": 1}}, [b"\x00\x01"])
    asyncio.run(router.handle(FakeGuest(), "comm_msg", parent))
    assert calls.sent == [("comm_msg", {
        "comm_id": "c1", "data": {"x": 1}, "metadata": {"version": "2.1.0"},
        "buffers": [base64.b64encode(b"\x00\x01").decode()],
        "parent": {"header": {"msg_id": "m1", "msg_type": "comm_msg"}},
    })]
    assert iopub.last_parent is parent and iopub.published == []


def test_comm_open_without_a_guest_is_closed_on_the_frontend():
    router, iopub, calls = _router()
    parent = _request("comm_open", {"comm_id": "c2", "target_name": "t", "data": {}})
    asyncio.run(router.handle(None, "comm_open", parent))
    assert calls.sent == []
    assert iopub.published == [("comm_close", {"comm_id": "c2", "data": {}}, parent)]


def test_host_widget_comms_are_answered_by_the_host_widgets_not_the_guest():
    router, iopub, calls = _router()

    async def run() -> str:
        widget = router.host_widgets().html(value="<b>hi</b>")
        iopub.published.clear()
        ask = _request("comm_msg", {"comm_id": widget.comm_id, "data": {"method": "request_state"}})
        await router.handle(FakeGuest(), "comm_msg", ask)
        await router.handle(FakeGuest(), "comm_close", _request("comm_close", {
            "comm_id": widget.comm_id, "data": {}}))
        return widget.comm_id

    comm_id = asyncio.run(run())
    assert calls.sent == []
    ((msg_type, content, parent),) = iopub.published
    assert msg_type == "comm_msg" and content["comm_id"] == comm_id
    assert content["data"]["method"] == "update" and content["data"]["state"]["value"] == "<b>hi</b>"
    assert parent["header"]["msg_id"] == "m1"
    assert not router.host_widgets().owns(comm_id)  # closed by the frontend


def test_comm_info_lists_the_guests_comms_and_the_host_widgets():
    guest_comms = {"g1": {"target_name": "jupyter.widget"}}
    router, _, calls = _router({"status": "ok", "comms": guest_comms})
    info = _request("comm_info_request", {"target_name": "jupyter.widget"})
    assert asyncio.run(router.comm_info(FakeGuest(), info)) == {"status": "ok",
                                                                "comms": guest_comms}
    assert calls.sent == [("comm_info", {"target_name": "jupyter.widget"})]

    async def with_widget() -> tuple[str, dict]:
        widget = router.host_widgets().html(value="x")
        return widget.comm_id, await router.comm_info(FakeGuest(), info)

    comm_id, reply = asyncio.run(with_widget())
    assert reply["status"] == "ok"
    assert reply["comms"]["g1"] == {"target_name": "jupyter.widget"}
    assert reply["comms"][comm_id] == {"target_name": "jupyter.widget"}
    other = _request("comm_info_request", {"target_name": "other"})
    router_reply = asyncio.run(router.comm_info(None, other))
    assert router_reply == {"status": "ok", "comms": {}}  # no guest; widgets are jupyter.widget
