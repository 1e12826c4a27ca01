"""Shell requests the guest answers for the frontend (comm_open/msg/close, complete, inspect):
everything they cause is published with the request as parent, between its busy and idle,
as plain ipykernel (kernelspec `python3` of this venv) does. Frontends stop routing a
request's output once its idle has arrived, so anything later is lost to them."""
from __future__ import annotations

import json
import queue
import time

import pytest

from .harness import KERNEL, SLOW, Kernel

WIDGETS = """\
import ipywidgets as w
slider = w.IntSlider(value=1)
out = w.Output()
def on_value(change):
    print('observer saw', change['new'])
    with out:
        print('inside the Output widget', change['new'])
slider.observe(on_value, names='value')
display(slider, out)
"""

PRINTS_ON_LOOKUP = """\
class Noisy:
    def __dir__(self):
        print('dir was asked')
        return ['alpha', 'beta']
    def __getattr__(self, name):
        print('getattr', name)
        raise AttributeError(name)
noisy = Noisy()
"""


@pytest.fixture(scope="module")
def microvm():
    k = Kernel(KERNEL)
    yield k
    k.shutdown()


@pytest.fixture(scope="module")
def ipykernel():
    """Plain ipykernel: the reference every trace here is compared with."""
    k = Kernel("python3")
    yield k
    k.shutdown()


def _drain(k: Kernel) -> None:
    time.sleep(0.2 * SLOW)
    k.flush()


def _send(k: Kernel, msg_type: str, content: dict) -> str:
    msg = k.kc.session.msg(msg_type, content)
    k.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def _collect(k: Kernel, ids: list[str], idle_for: str, after: float = 0.5,
             timeout: float = 60) -> list[tuple[str, dict]]:
    """IOPub messages whose parent is one of `ids` (as (parent id, message)), until `idle_for`'s
    idle and then `after` seconds more (anything late would show up in the list)."""
    deadline = time.monotonic() + timeout * SLOW
    seen: list[tuple[str, dict]] = []
    stop_at = None
    while True:
        now = time.monotonic()
        if stop_at is not None and now >= stop_at:
            return seen
        if now >= deadline:
            raise AssertionError(f"no idle for {idle_for}; saw {[m['msg_type'] for _, m in seen]}")
        try:
            msg = k.kc.iopub_channel.get_msg(timeout=0.05)
        except queue.Empty:
            continue
        parent = msg["parent_header"].get("msg_id")
        if parent not in ids:
            continue
        seen.append((parent, msg))
        if (parent == idle_for and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle" and stop_at is None):
            # Plain ipykernel is the reference: only ours is watched for stragglers.
            stop_at = time.monotonic() + (after * SLOW if k.km.kernel_name != "python3" else 0)


def _summary(seen: list[tuple[str, dict]], names: dict[str, str]) -> list[tuple]:
    """Message types in order with what a frontend acts on; parents and msg_ids by role,
    consecutive stream texts of one stream merged (how they are split is not behaviour)."""
    out: list[tuple] = []
    for parent, msg in seen:
        kind, c = msg["msg_type"], msg["content"]
        if kind == "status":
            item: tuple = (names[parent], kind, c["execution_state"])
        elif kind == "stream":
            if out and out[-1][:3] == (names[parent], kind, c["name"]):
                out[-1] = out[-1][:3] + (out[-1][3] + c["text"],)
                continue
            item = (names[parent], kind, c["name"], c["text"])
        elif kind == "comm_msg":
            state = {key: names.get(v, v) if isinstance(v, str) else v
                     for key, v in (c["data"].get("state") or {}).items()}
            item = (names[parent], kind, c["data"].get("method"), json.dumps(state, sort_keys=True))
        else:
            item = (names[parent], kind)
        out.append(item)
    return out


def _apart(trace: list[tuple]) -> tuple[list[tuple], dict[tuple, str]]:
    """(the trace without streams, all stream text per request and stream). When buffered
    stream text leaves relative to comm messages is not behaviour: ipykernel sends a print
    at its next flush, the guest before the next comm message."""
    texts: dict[tuple, str] = {}
    for item in trace:
        if item[1] == "stream":
            texts[item[0], item[2]] = texts.get((item[0], item[2]), "") + item[3]
    return [item for item in trace if item[1] != "stream"], texts


def _slider_trace(k: Kernel, during_cell: bool = False) -> list[tuple]:
    reply, _ = k.execute(WIDGETS, timeout=60)
    assert reply["status"] == "ok", reply
    model_id = k.value("slider.model_id").strip("'")
    _drain(k)
    ids, names = [], {}
    if during_cell:
        cell = k.kc.execute("import time; time.sleep(2)")
        ids.append(cell)
        names[cell] = "cell"
        time.sleep(0.3)  # the cell is running when the widget update arrives
    comm = _send(k, "comm_msg", {"comm_id": model_id, "data": {
        "method": "update", "state": {"value": 5}, "buffer_paths": []}})
    ids.append(comm)
    names[comm] = "comm_msg"
    return _summary(_collect(k, ids, idle_for=comm), names)


def test_widget_update_trace_matches_ipykernel(microvm, ipykernel):
    """A slider moved in the frontend: echo_update, the observer's print, the Output widget's
    msg_id set to the comm_msg and back, its print, all before idle."""
    ours, theirs = _slider_trace(microvm), _slider_trace(ipykernel)
    assert ours == theirs
    assert ours[0] == ("comm_msg", "status", "busy") and ours[-1] == ("comm_msg", "status", "idle")
    assert ("comm_msg", "comm_msg", "update", '{"msg_id": "comm_msg"}') in ours
    assert ("comm_msg", "stream", "stdout", "inside the Output widget 5\n") in ours


def test_widget_update_during_a_cell_waits_for_it(microvm, ipykernel):
    """ipykernel handles a comm message that arrives while a cell runs after that cell, with its
    own busy ... idle around the callback's output."""
    ours, theirs = _slider_trace(microvm, during_cell=True), _slider_trace(ipykernel, during_cell=True)
    assert ours == theirs
    assert ours.index(("cell", "status", "idle")) < ours.index(("comm_msg", "status", "busy"))


def test_comm_open_and_close_output_before_idle(microvm, ipykernel):
    setup = ("import comm\n"
             "def _target(c, msg):\n"
             "    print('opened with', msg['content']['data'])\n"
             "    c.send({'hello': 1})\n"
             "    c.on_close(lambda m: print('closed'))\n"
             "comm.get_comm_manager().register_target('talk', _target)\n")
    traces = []
    for k in (microvm, ipykernel):
        reply, _ = k.execute(setup)
        assert reply["status"] == "ok", reply
        _drain(k)
        opened = _send(k, "comm_open", {"comm_id": "talk-1", "target_name": "talk",
                                        "data": {"x": 1}})
        trace = _summary(_collect(k, [opened], idle_for=opened), {opened: "comm_open"})
        closed = _send(k, "comm_close", {"comm_id": "talk-1", "data": {}})
        trace += _summary(_collect(k, [closed], idle_for=closed), {closed: "comm_close"})
        traces.append(trace)
    assert _apart(traces[0]) == _apart(traces[1])
    for trace in traces[0][:traces[0].index(("comm_open", "status", "idle")) + 1], traces[0]:
        assert trace[-1][2] == "idle"  # each request's output before its idle
    assert ("comm_open", "stream", "stdout", "opened with {'x': 1}\n") in traces[0]
    assert ("comm_close", "stream", "stdout", "closed\n") in traces[0]


@pytest.mark.parametrize("request_kind", ["complete", "inspect"])
def test_introspection_output_before_idle(microvm, ipykernel, request_kind):
    """Output while the guest completes or inspects (user objects run code then) is the
    request's, before its idle, and the reply still comes."""
    kinds = []
    for k in (microvm, ipykernel):
        reply, _ = k.execute(PRINTS_ON_LOOKUP)
        assert reply["status"] == "ok", reply
        _drain(k)
        if request_kind == "complete":
            msg_id = k.kc.complete("noisy.", 6)
        else:
            msg_id = k.kc.inspect("noisy", 5)
        trace = _summary(_collect(k, [msg_id], idle_for=msg_id), {msg_id: request_kind})
        assert trace[0][2] == "busy" and trace[-1][2] == "idle", trace
        assert any(item[1] == "stream" for item in trace), trace
        reply = k.kc.get_shell_msg(timeout=30 * SLOW)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = k.kc.get_shell_msg(timeout=30 * SLOW)
        assert reply["content"]["status"] == "ok"
        kinds.append([item[:2] for item in trace])
    # What runs differs between the guest's and ipykernel's completer; the shape does not.
    assert set(kinds[0]) == set(kinds[1])


def test_interrupt_ends_a_widget_callback(microvm):
    """A callback that loops: an interrupt stops it, the comm_msg ends with its idle and the
    guest runs the next cell."""
    reply, _ = microvm.execute(
        "import ipywidgets as w, time\nspin = w.IntSlider()\n"
        "def forever(change):\n    while True:\n        time.sleep(0.05)\n"
        "spin.observe(forever, names='value')\n")
    assert reply["status"] == "ok", reply
    model_id = microvm.value("spin.model_id").strip("'")
    _drain(microvm)
    comm = _send(microvm, "comm_msg", {"comm_id": model_id, "data": {
        "method": "update", "state": {"value": 3}, "buffer_paths": []}})
    _wait_busy(microvm, comm)
    time.sleep(0.5 * SLOW)
    microvm.km.interrupt_kernel()
    trace = _summary(_collect(microvm, [comm], idle_for=comm), {comm: "comm_msg"})
    assert trace[-1] == ("comm_msg", "status", "idle"), trace
    assert microvm.value("spin.value") == "3"


def _wait_busy(k: Kernel, msg_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        try:
            msg = k.kc.iopub_channel.get_msg(timeout=0.05)
        except queue.Empty:
            continue
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "busy"):
            return
    raise AssertionError(f"no busy for {msg_id}")


def test_interrupt_frees_the_kernel_from_a_guest_that_ignores_it(microvm):
    """A callback that ignores SIGINT and runs on: the kernel stops waiting for it (idle for the
    comm_msg) well before it ends; what the guest does afterwards goes on in order. It runs on
    for 8 s after the interrupt: past the kernel's 5 s wait for a comm request
    (INTERRUPT_GRACE), within the 30 s `interrupt_grace` after which the REPL would be reset."""
    reply, _ = microvm.execute(
        "import ipywidgets as w, signal, time\nstubborn = w.IntSlider()\n"
        "def ignore_interrupts(change):\n"
        "    seen = []\n"
        "    old = signal.signal(signal.SIGINT, lambda *a: seen.append(time.monotonic()))\n"
        "    try:\n"
        "        while not seen or time.monotonic() - seen[0] < 8:\n"
        "            time.sleep(0.05)\n"
        "    finally:\n"
        "        signal.signal(signal.SIGINT, old)\n"
        "    print('callback finished')\n"
        "stubborn.observe(ignore_interrupts, names='value')\n")
    assert reply["status"] == "ok", reply
    model_id = microvm.value("stubborn.model_id").strip("'")
    _drain(microvm)
    comm = _send(microvm, "comm_msg", {"comm_id": model_id, "data": {
        "method": "update", "state": {"value": 4}, "buffer_paths": []}})
    _wait_busy(microvm, comm)
    time.sleep(0.5 * SLOW)
    microvm.km.interrupt_kernel()
    trace = _summary(_collect(microvm, [comm], idle_for=comm, after=0), {comm: "comm_msg"})
    assert trace[-1] == ("comm_msg", "status", "idle"), trace
    assert not [item for item in trace if item[1] == "stream"], trace  # it was still running
    # The guest finishes the callback, then runs the next cell.
    assert microvm.value("stubborn.value", timeout=60) == "4"


def test_guest_death_in_a_callback_is_told_before_idle():
    """The guest dies inside a widget callback: the comm_msg's trace says so before its idle,
    and the next cell runs in a fresh guest."""
    k = Kernel(KERNEL)
    try:
        reply, _ = k.execute("import ipywidgets as w, os\nfatal = w.IntSlider()\n"
                             "fatal.observe(lambda change: os._exit(3), names='value')\n")
        assert reply["status"] == "ok", reply
        model_id = k.value("fatal.model_id").strip("'")
        _drain(k)
        comm = _send(k, "comm_msg", {"comm_id": model_id, "data": {
            "method": "update", "state": {"value": 1}, "buffer_paths": []}})
        trace = _summary(_collect(k, [comm], idle_for=comm), {comm: "comm_msg"})
        assert trace[0] == ("comm_msg", "status", "busy") and trace[-1][2] == "idle", trace
        notices = [item for item in trace if item[1] == "stream" and item[2] == "stderr"]
        assert notices and "died" in notices[0][3], trace
        assert k.value("1 + 1", timeout=120) == "2"
    finally:
        k.shutdown()
