"""Widgets that live in the kernel process, not in the guest: the ipywidgets 8 comm protocol spoken
directly on the kernel's IOPub socket (used by %pool).

A widget here is an `HTML` model (with its `Layout` and `HTMLStyle` models) of
`@jupyter-widgets/controls` 2.0.0, protocol 2.1.0 — exactly what ``ipywidgets.HTML`` sends, built
without importing ipywidgets in the kernel process (its comm machinery wants an IPython kernel).

    registry = kernel.comms.host_widgets()  # one per kernel (kernel/comms.py)
    w = registry.html(value="<b>hi</b>")    # comm_open x3 on IOPub
    w.display()                             # display_data with the widget view
    w.update(value="<b>bye</b>")            # comm_msg {"method": "update"}
    registry.start_ticker(w, render, 1.0)   # re-render from a host thread every second

Messages from the frontend for these comm ids (``request_state``, ``update``, comm_close) are
answered here by `handle_comm`: the kernel's comm router asks `owns(comm_id)` and hands them
over, so they never reach the guest; comm_info_reply adds `comm_info(target)`. Sends from the ticker thread are
handed to the kernel's event loop, which owns the IOPub session.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from typing import Any, Callable, Optional

log = logging.getLogger("supermachine_kernel.magics.widget")

PROTOCOL_VERSION = "2.1.0"
TARGET_NAME = "jupyter.widget"
VIEW_MIME = "application/vnd.jupyter.widget-view+json"
CONTROLS = ("@jupyter-widgets/controls", "2.0.0")
BASE = ("@jupyter-widgets/base", "2.0.0")

_LAYOUT_KEYS = (
    "align_content align_items align_self border_bottom border_left border_right border_top "
    "bottom display flex flex_flow grid_area grid_auto_columns grid_auto_flow grid_auto_rows "
    "grid_column grid_gap grid_row grid_template_areas grid_template_columns grid_template_rows "
    "height justify_content justify_items left margin max_height max_width min_height min_width "
    "object_fit object_position order overflow padding right top visibility width"
).split()


def _model(name: str, module: tuple[str, str], view: str, view_module: tuple[str, str]) -> dict:
    return {
        "_model_module": module[0], "_model_module_version": module[1], "_model_name": name,
        "_view_module": view_module[0], "_view_module_version": view_module[1],
        "_view_name": view, "_view_count": None,
    }


def layout_state() -> dict:
    return dict(_model("LayoutModel", BASE, "LayoutView", BASE), **{k: None for k in _LAYOUT_KEYS})


def html_style_state() -> dict:
    return dict(_model("HTMLStyleModel", CONTROLS, "StyleView", BASE),
                background=None, description_width="", font_size=None, text_color=None)


def html_state(value: str, layout_id: str, style_id: str) -> dict:
    return dict(
        _model("HTMLModel", CONTROLS, "HTMLView", CONTROLS),
        _dom_classes=[], description="", description_allow_html=False,
        layout=f"IPY_MODEL_{layout_id}", style=f"IPY_MODEL_{style_id}",
        placeholder="\u200b", tabbable=None, tooltip=None, value=value,
    )


class HostWidget:
    """One host-side model: its comm id and current state."""

    def __init__(self, registry: "HostWidgets", state: dict, text: str) -> None:
        self.registry = registry
        self.comm_id = uuid.uuid4().hex
        self.state = state
        self.text = text  # text/plain shown where widgets don't render
        self.closed = False

    def display(self, parent: Optional[dict] = None) -> None:
        self.registry.publish("display_data", {
            "data": {"text/plain": self.text,
                     VIEW_MIME: {"version_major": 2, "version_minor": 0, "model_id": self.comm_id}},
            "metadata": {}, "transient": {},
        }, parent=parent)

    def update(self, **changes: Any) -> None:
        """Sends the changed attributes (no-op when nothing changed or the comm is closed)."""
        changes = {k: v for k, v in changes.items() if self.state.get(k) != v}
        if self.closed or not changes:
            return
        self.state.update(changes)
        self.registry.send_msg(self, {"method": "update", "state": changes, "buffer_paths": []})


class HostWidgets:
    """The kernel's host-side widgets, the IOPub side of their comms and the ticker thread."""

    def __init__(self, publish: Callable[..., None],
                 call_soon: Callable[[Callable[[], None]], object]) -> None:
        # publish(msg_type, content, metadata=..., parent=...) must run on the kernel's loop;
        # call_soon(fn) schedules fn there from any thread.
        self._publish = publish
        self._call_soon = call_soon
        self.widgets: dict[str, HostWidget] = {}
        self._tickers: list[tuple[HostWidget, Callable[[], dict], float]] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.parent: Optional[dict] = None  # header the comm messages answer to

    # -- IOPub ---------------------------------------------------------------------------------

    def publish(self, msg_type: str, content: dict, metadata: Optional[dict] = None,
                parent: Optional[dict] = None) -> None:
        self._publish(msg_type, content, metadata=metadata, parent=parent or self.parent)

    def send_msg(self, w: HostWidget, data: dict, parent: Optional[dict] = None) -> None:
        self.publish("comm_msg", {"comm_id": w.comm_id, "data": data},
                     metadata={"version": PROTOCOL_VERSION}, parent=parent)

    def _open(self, state: dict, text: str) -> HostWidget:
        w = HostWidget(self, state, text)
        self.widgets[w.comm_id] = w
        self.publish("comm_open", {
            "comm_id": w.comm_id, "target_name": TARGET_NAME,
            "data": {"state": state, "buffer_paths": []},
        }, metadata={"version": PROTOCOL_VERSION})
        return w

    def html(self, value: str, text: str = "HTML(…)") -> HostWidget:
        """An HTML widget (and its layout and style models), opened on the frontend."""
        layout = self._open(layout_state(), "Layout()")
        style = self._open(html_style_state(), "HTMLStyle()")
        return self._open(html_state(value, layout.comm_id, style.comm_id), text)

    # -- frontend → kernel ---------------------------------------------------------------------

    def owns(self, comm_id: Any) -> bool:
        return isinstance(comm_id, str) and comm_id in self.widgets

    def handle_comm(self, msg_type: str, content: dict, parent: Optional[dict] = None) -> None:
        """A comm_msg/comm_close from the frontend for one of our comm ids (``parent``: its
        header, which the answer refers to)."""
        comm_id = content.get("comm_id")
        w = self.widgets.get(comm_id) if isinstance(comm_id, str) else None
        if w is None:
            return
        if msg_type == "comm_close":
            w.closed = True
            self.widgets.pop(w.comm_id, None)
            with self._lock:
                self._tickers = [t for t in self._tickers if t[0] is not w]
            return
        data = content.get("data") or {}
        method = data.get("method")
        if method == "request_state":
            self.send_msg(w, {"method": "update", "state": dict(w.state), "buffer_paths": []},
                          parent=parent)
        elif method == "update":  # the frontend changed attributes (echo them into our state)
            state = data.get("state")
            if isinstance(state, dict):
                w.state.update({k: v for k, v in state.items() if k in w.state})
        # "custom" and anything else: these widgets have no handlers.

    def comm_info(self, target_name: Optional[str]) -> dict:
        if target_name not in (None, TARGET_NAME):
            return {}
        return {cid: {"target_name": TARGET_NAME} for cid in self.widgets}

    # -- live updates --------------------------------------------------------------------------

    def start_ticker(self, w: HostWidget, render: Callable[[], dict], interval: float = 1.0) -> None:
        """Every ``interval`` s, ``render()`` (on the ticker thread) → ``w.update(**result)``
        (on the kernel's loop). One thread serves every ticking widget."""
        with self._lock:
            self._tickers.append((w, render, interval))
            if self._thread is None:
                self._thread = threading.Thread(target=self._tick_loop, name="host-widgets",
                                                daemon=True)
                self._thread.start()

    def _tick_loop(self) -> None:
        due: dict[int, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                tickers = list(self._tickers)
            for w, render, interval in tickers:
                if w.closed or due.get(id(w), 0.0) > now:
                    continue
                due[id(w)] = now + interval
                try:
                    changes = render()
                except Exception:  # noqa: BLE001 - a render bug must not stop the others
                    log.exception("rendering host widget %s failed", w.comm_id)
                    continue
                self._call_soon(functools.partial(w.update, **changes))
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
