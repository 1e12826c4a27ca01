"""Comm routing: every comm message from the frontend, and comm_info, in one place.

comm_open, comm_msg and comm_close go to the guest's comm manager (ipywidgets and friends run
there), unless the comm belongs to a host widget (magics/widget.py: %pool's widget lives in the
kernel process), which then answers it here and the guest never sees it, or to the UI channel
(target ``supermachine.vm``, ui_channel.py: the JupyterLab extension's), answered here too. comm_info_reply lists
the guest's comms and the host widgets' (so widgets survive a page reload). The host widgets
are created on first use (`host_widgets`) and asked (`owns`, `comm_info`), never patched in.
Comm messages the guest sends arrive as guest events (iopub.py).
"""
from __future__ import annotations

import asyncio
import base64
import typing as t

from ipykernel.kernelbase import Kernel

from ..magics.widget import HostWidgets
from ..repl_client import GuestDied, GuestRepl, GuestUnavailable, ProtocolError
from .interrupt import GuestCalls, GuestUnanswered
from .iopub import IopubRelay
from .ui_channel import TARGET_NAME as UI_TARGET
from .ui_channel import UiChannel

COMM_INFO_TIMEOUT = 10.0  # seconds the guest has to list its comms


def parent_stub(parent: dict) -> dict:
    """The part of a request's header the guest may know (libraries route output by msg_id)."""
    header = parent.get("header") or {}
    return {"header": {"msg_id": header.get("msg_id", ""), "msg_type": header.get("msg_type", "")}}


class CommRouter:
    """One per kernel: the frontend's comm messages to the guest or to the host widgets."""

    def __init__(self, kernel: Kernel, iopub: IopubRelay, calls: GuestCalls) -> None:
        self._kernel = kernel
        self._iopub = iopub
        self._calls = calls
        self._widgets: HostWidgets | None = None
        self.ui = UiChannel(kernel, iopub.publish)

    def host_widgets(self) -> HostWidgets:
        """The kernel's host widgets (created on first use, on the shell loop)."""
        if self._widgets is None:
            loop = asyncio.get_running_loop()
            self._widgets = HostWidgets(self._iopub.publish, loop.call_soon_threadsafe)
        return self._widgets

    async def handle(self, guest: GuestRepl | None, kind: str, parent: dict) -> None:
        """A comm_open/comm_msg/comm_close request from the frontend. Returns once the handler
        (a host widget's, or the guest's: user code, widget callbacks) finished and its output
        was published."""
        content = parent.get("content") or {}
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str):
            return
        if (kind == "comm_open" and content.get("target_name") == UI_TARGET) or \
                (kind != "comm_open" and self.ui.owns(comm_id)):
            await self.ui.handle(kind, content, parent)
            return
        widgets = self._widgets
        if kind != "comm_open" and widgets is not None and widgets.owns(comm_id):
            widgets.handle_comm(kind, content, parent=parent)
            return
        self._iopub.last_parent = parent
        if guest is None or not guest.alive:  # no guest: its comms died with it
            if kind == "comm_open":  # nobody to talk to: close it on the frontend
                self._iopub.publish("comm_close", {"comm_id": comm_id, "data": {}}, parent=parent)
            return
        fields: dict[str, t.Any] = {
            "comm_id": comm_id,
            "data": content.get("data") or {},
            "metadata": parent.get("metadata") or {},
            "buffers": [base64.b64encode(bytes(b)).decode("ascii")
                        for b in parent.get("buffers") or []],
            "parent": parent_stub(parent),
        }
        if kind == "comm_open":
            fields["target_name"] = str(content.get("target_name", ""))
            fields["target_module"] = content.get("target_module")
        log = self._kernel.log
        try:
            reply = await self._calls.request(guest, kind, parent, **fields)
        except (GuestDied, GuestUnavailable, GuestUnanswered, ProtocolError) as e:
            log.warning("%s %s: %s", kind, comm_id, e)  # a death is announced on IOPub
            return
        if reply.get("status") == "error":  # ipykernel logs a failing comm handler, too
            log.warning("%s %s failed in the guest: %s: %s", kind, comm_id,
                        reply.get("ename"), reply.get("evalue"))

    async def comm_info(self, guest: GuestRepl | None, parent: dict) -> dict:
        """The comm_info_reply content: the guest's comms, then the host widgets'."""
        target = (parent.get("content") or {}).get("target_name")
        reply: dict = {"status": "ok", "comms": {}}
        if guest is not None and guest.alive:
            try:
                reply = await asyncio.wait_for(
                    self._calls.request(guest, "comm_info", parent, target_name=target),
                    COMM_INFO_TIMEOUT)
            except Exception as e:  # noqa: BLE001
                self._kernel.log.warning("comm_info from the guest failed: %s", e)
        widgets = self._widgets
        if widgets is not None:
            reply = {"status": "ok", "comms": {**(reply.get("comms") or {}),
                                                **widgets.comm_info(target)}}
        if self.ui.comms:
            reply = {"status": "ok", "comms": {**(reply.get("comms") or {}),
                                                **self.ui.comm_info(target)}}
        return reply
