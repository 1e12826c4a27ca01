"""Benchmark: soak — N "Python (microVM)" kernels x M minutes of mixed cells through real kernels
(jupyter_client), every result checked (issue 16 item 7).

Each kernel is driven by its own thread, one cell at a time, drawing cell kinds at random (--seed;
each kernel its own stream) until its M minutes are up:
  small      arithmetic on a per-cell nonce: stdout and execute_result must be the known values
  large      500-3000 numbered stdout lines (20-200 chars) and 20-200 stderr lines, compared whole
  plot       a matplotlib figure: exactly one image/png display_data (PNG magic) and a stdout line
  widget     an ipywidgets IntSlider: comm_open with its state and view, an update sent from the
             "frontend" (comm_msg), a guest-side change (its comm_msg update and stdout), close
  error      a cell raising ValueError(nonce): the error reply and IOPub error must carry it
  input      input() answered on the stdin channel: the prompt and the doubled answer are checked
  interrupt  a cell sleeping in time.sleep(600) interrupted 0.1-1.5 s after its first output: it
             must end (KeyboardInterrupt) and the next cell must work; latency = interrupt -> idle
  snapshot   %snapshot --force of a variable holding the nonce, the variable changed, %restore,
             and the variable read back (latencies of %snapshot and %restore kept apart)
  idle       (with --idle-suspend S) the kernel is left alone until its VM is suspended to disk
             (no QEMU process left), then the variable set before is read back; latency = that
             first cell, which resumes the VM
  death      once per kernel, at a random time in the middle of its run: the QEMU pid named by
             %vm is SIGKILLed while a cell sleeps; that cell must fail with GuestDied, the next
             must find its variables gone (a fresh VM) and work; latency = kill -> idle
Every IOPub, shell and stdin message is checked against the request it answers: anything whose
parent is another request of ours, or that arrives after its request went idle, is "mixed"; a
cell whose value, text or status is not the one expected is "lost". Both must be 0.

Besides, every 5 s: the resident size (RSS) and open file descriptors of each kernel process
(psutil) and its QEMU processes. After all kernels shut down: leftover kernel and QEMU
processes, and leftover files. The kernels run with private XDG_RUNTIME_DIR (the VMs' work
dirs: sockets, serial log, QEMU stderr), JUPYTER_DATA_DIR (suspend snapshots; the %snapshot
store, which outlives kernels by design and is reported apart) and TMPDIR, and their connection
files go to a private JUPYTER_RUNTIME_DIR, so whatever is left in them is theirs. Removed at exit.

Run: .venv/bin/python bench/soak.py [--kernels 2] [--minutes 1] [--seed 1] [--think 0.2]
     [--idle-suspend S] [--pool-min N] [--kernel-arg ARG ...] [--skip KIND ...] [--json FILE]
     [--verbose]
Exit status 1 when a result was lost or mixed, a cell timed out, or something was left over.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import queue
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(__file__))
from common import median, percentile  # noqa: E402

import psutil  # noqa: E402
import zmq  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

from supermachine_kernel.cli.install import install, prepare  # noqa: E402

KERNEL_NAME = "smk-bench-soak"
WEIGHTS = {"small": 30, "large": 10, "plot": 8, "widget": 8, "input": 8, "error": 4,
           "interrupt": 6, "snapshot": 4}
CELL_TIMEOUT = 300.0  # s; 8 kernels on 2 cores under TCG: generous, a timeout is a finding
AFTER_INTERRUPT = 120.0  # s a cell may take to end once interrupted (or its guest killed)
SAMPLE_EVERY = 5.0
IDLE_WEIGHT = 2  # with --idle-suspend: each one waits the idle time, so few
EXPECTED_ENAMES = {"interrupt": "KeyboardInterrupt", "death": "GuestDied", "error": "ValueError"}


class CellTimeout(Exception):
    """A cell that did not reach idle and its execute_reply in time."""


@dataclass
class Cell:
    """What came back for one execute_request."""
    msg_id: str
    reply: Optional[dict] = None
    outputs: list[dict] = field(default_factory=list)
    input_requests: list[dict] = field(default_factory=list)
    sent: float = 0.0
    done: float = 0.0
    action_at: Optional[float] = None  # when the interrupt / kill was sent

    def stream(self, name: str) -> str:
        return "".join(m["content"]["text"] for m in self.outputs
                       if m["msg_type"] == "stream" and m["content"]["name"] == name)

    def of_type(self, *types: str) -> list[dict]:
        return [m for m in self.outputs if m["msg_type"] in types]

    def result(self) -> Optional[str]:
        for m in self.of_type("execute_result"):
            return m["content"]["data"].get("text/plain")
        return None

    def texts(self) -> str:
        """Every text the cell showed: streams and text/plain of results and displays."""
        parts = [self.stream("stdout"), self.stream("stderr")]
        for m in self.of_type("execute_result", "display_data"):
            parts.append(m["content"]["data"].get("text/plain", ""))
        return "\n".join(parts)


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    qemus: int


class Driver:
    """One kernel process and the thread that feeds it cells."""

    def __init__(self, index: int, seed: int, minutes: float, think: float, env: dict,
                 cwd: str, verbose: bool, weights: dict[str, int], idle_suspend: float) -> None:
        self.index = index
        self.idle_suspend = idle_suspend
        self.weights = weights
        self.rng = random.Random(seed * 1000 + index)
        self.minutes = minutes
        self.think = think
        self.verbose = verbose
        self.km = KernelManager(kernel_name=KERNEL_NAME)
        self.km.start_kernel(env=env, cwd=cwd)
        self.pid: int = self.km.provisioner.process.pid  # type: ignore[union-attr]
        self.kc: Any = None
        self.ours: dict[str, str] = {}   # msg_id -> "open" | "done" (every request we sent)
        self.aux: set[str] = set()       # requests with no reply of their own (comm_msg)
        self.cells = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.lost: list[str] = []
        self.mixed: list[str] = []
        self.unparented: list[str] = []
        self.errors: collections.Counter = collections.Counter()
        self.expected: collections.Counter = collections.Counter()
        self.samples: list[Sample] = []
        self.qemu_seen: set[int] = set()
        self.stuck: Optional[str] = None
        self.crash: Optional[str] = None
        self.started = 0.0
        self.ended = 0.0
        self.death_at = 0.0
        self.snap_slot = 0
        self.ready_s = 0.0

    # ---- the message loop ---------------------------------------------------------------------
    def log(self, text: str) -> None:
        if self.verbose:
            print(f"[k{self.index} {time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    def lose(self, kind: str, why: str) -> None:
        self.lost.append(f"{kind}: {why}")
        print(f"[k{self.index}] LOST {kind}: {why}", flush=True)

    def _foreign(self, channel: str, msg: dict, current: Optional[str]) -> None:
        """A message that is not for the request being run: mixed, unless it is expected."""
        parent = msg["parent_header"].get("msg_id")
        mtype = msg["msg_type"]
        if parent in self.aux:
            return  # a frontend comm_msg's busy/idle and what the guest sends in answer
        if not parent:
            self.unparented.append(f"{channel} {mtype}: {json.dumps(msg['content'])[:200]}")
            return
        state = self.ours.get(parent)
        if state is None:
            why = "of a request we never sent"
        elif state == "done":
            why = "after its request had finished"
        else:
            why = "of another open request"
        self.mixed.append(f"{channel} {mtype} {why} (while running {current}): "
                          f"{json.dumps(msg['content'])[:200]}")
        print(f"[k{self.index}] MIXED {self.mixed[-1]}", flush=True)

    def _drain(self, deadline: float, cell: Optional[Cell],
               on_msg: Optional[Callable[[Cell, dict], None]] = None,
               on_input: Optional[Callable[[dict], Optional[str]]] = None,
               action: Optional[Callable[[], None]] = None, discard: bool = False) -> None:
        """Reads the three channels until `cell` has its reply and idle status (or, with no
        cell, until `deadline`), checking every message's parent. `action` runs once, in this
        thread, when cell.action_at is due."""
        poller = zmq.Poller()
        socks = {self.kc.iopub_channel.socket: ("iopub", self.kc.iopub_channel),
                 self.kc.shell_channel.socket: ("shell", self.kc.shell_channel),
                 self.kc.stdin_channel.socket: ("stdin", self.kc.stdin_channel)}
        for s in socks:
            poller.register(s, zmq.POLLIN)
        idle = False
        acted = False
        current = cell.msg_id if cell else None
        while True:
            now = time.monotonic()
            if cell is not None and idle and cell.reply is not None:
                cell.done = now
                self.ours[cell.msg_id] = "done"
                return
            if now >= deadline:
                if cell is None:
                    return
                raise CellTimeout(f"no {'reply' if cell.reply is None else 'idle status'} "
                                  f"after {now - cell.sent:.0f} s")
            wake = deadline
            if action is not None and not acted and cell is not None and cell.action_at:
                if now >= cell.action_at:
                    acted = True
                    cell.action_at = time.monotonic()
                    action()
                    continue
                wake = min(wake, cell.action_at)
            ready = dict(poller.poll(max(1, int((wake - now) * 1000))))
            for sock, (channel, ch) in socks.items():
                if sock not in ready:
                    continue
                while True:
                    try:
                        msg = ch.get_msg(timeout=0)
                    except queue.Empty:
                        break
                    parent = msg["parent_header"].get("msg_id")
                    if discard:
                        continue
                    if cell is None or parent != current:
                        self._foreign(channel, msg, current)
                        continue
                    if channel == "iopub":
                        if msg["msg_type"] == "status":
                            if msg["content"]["execution_state"] == "idle":
                                if idle:
                                    self.mixed.append(f"iopub: a second idle status for {current}")
                                idle = True
                            continue
                        if msg["msg_type"] == "execute_input":
                            continue
                        if idle:
                            self.mixed.append(f"iopub {msg['msg_type']} after its request's idle "
                                              f"status: {json.dumps(msg['content'])[:200]}")
                            continue
                        cell.outputs.append(msg)
                        if on_msg is not None:
                            on_msg(cell, msg)
                    elif channel == "shell":
                        if cell.reply is not None:
                            self.mixed.append(f"shell: a second reply for {current}")
                        cell.reply = msg["content"]
                    else:
                        cell.input_requests.append(msg["content"])
                        value = on_input(msg["content"]) if on_input else None
                        self.kc.input(value if value is not None else "")

    def run(self, code: str, timeout: float = CELL_TIMEOUT, **kw: Any) -> Cell:
        allow_stdin = kw.pop("allow_stdin", "on_input" in kw)
        cell = Cell(self.kc.execute(code, allow_stdin=allow_stdin))
        cell.sent = time.monotonic()
        self.ours[cell.msg_id] = "open"
        try:
            self._drain(cell.sent + timeout, cell, **kw)
        except CellTimeout:
            self.ours[cell.msg_id] = "done"  # what still comes for it counts as mixed
            raise
        return cell

    def interrupt(self) -> None:
        """An interrupt_request on the control channel, as km.interrupt_kernel() sends it in
        message mode, but with its msg_id known, so its busy/idle status is not foreign."""
        msg = self.kc.session.msg("interrupt_request", {})
        self.aux.add(msg["header"]["msg_id"])
        self.kc.control_channel.send(msg)

    def send_comm_msg(self, comm_id: str, data: dict) -> None:
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.aux.add(msg["header"]["msg_id"])
        self.kc.shell_channel.send(msg)

    # ---- checks -------------------------------------------------------------------------------
    def check(self, kind: str, cell: Cell, ok: bool, what: str, expect_ok: bool = True) -> bool:
        """Records `cell`'s status; True if the status and `ok` are as expected."""
        status = (cell.reply or {}).get("status")
        if expect_ok and status != "ok":
            ename = (cell.reply or {}).get("ename", status)
            self.errors[f"{kind}: {ename}"] += 1
            self.lose(kind, f"status {status} ({ename}: {(cell.reply or {}).get('evalue', '')[:200]})")
            return False
        if not ok:
            self.lose(kind, what)
            return False
        return True

    # ---- the cell kinds -----------------------------------------------------------------------
    def cell_small(self, nonce: int) -> None:
        a, b = self.rng.randrange(10**6), self.rng.randrange(10**6)
        c = self.run(f"_n = {nonce}\nprint('s', _n, {a} * {b})\n{a} + {b} + _n")
        self.latency["small"].append(c.done - c.sent)
        want_out, want_res = f"s {nonce} {a * b}\n", str(a + b + nonce)
        self.check("small", c, c.stream("stdout") == want_out and c.result() == want_res
                   and not c.stream("stderr"),
                   f"stdout {c.stream('stdout')[:100]!r} result {c.result()!r}, wanted "
                   f"{want_out!r} {want_res!r}")

    def cell_large(self, nonce: int) -> None:
        lines, width, errs = (self.rng.randrange(500, 3000), self.rng.randrange(20, 200),
                              self.rng.randrange(20, 200))
        c = self.run(
            "import sys\n"
            f"for _i in range({lines}):\n    print(f'{nonce}:{{_i}}:' + 'x' * {width})\n"
            f"sys.stderr.write(''.join(f'e{nonce}:{{_i}}\\n' for _i in range({errs})))\n")
        self.latency["large"].append(c.done - c.sent)
        want_out = "".join(f"{nonce}:{i}:" + "x" * width + "\n" for i in range(lines))
        want_err = "".join(f"e{nonce}:{i}\n" for i in range(errs))
        out, err = c.stream("stdout"), c.stream("stderr")
        self.check("large", c, out == want_out and err == want_err,
                   f"stdout {len(out)} chars (wanted {len(want_out)}, equal: {out == want_out}), "
                   f"stderr {len(err)} (wanted {len(want_err)}, equal: {err == want_err}); "
                   f"stderr starts {err[:200]!r}")

    def cell_plot(self, nonce: int) -> None:
        ys = [self.rng.randrange(100) for _ in range(5)]
        c = self.run("import matplotlib.pyplot as plt\nplt.figure()\n"
                     f"plt.plot({ys})\nplt.title('p{nonce}')\nplt.show()\nprint('plotted', {nonce})")
        self.latency["plot"].append(c.done - c.sent)
        pngs = [m for m in c.of_type("display_data") if "image/png" in m["content"]["data"]]
        good = len(pngs) == 1
        if good:
            raw = base64.b64decode(pngs[0]["content"]["data"]["image/png"])
            good = raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1000
        self.check("plot", c, good and c.stream("stdout") == f"plotted {nonce}\n",
                   f"{len(pngs)} image/png displays, stdout {c.stream('stdout')[:100]!r}")

    def cell_widget(self, nonce: int) -> None:
        v = nonce % 1000
        c = self.run(f"import ipywidgets as _w\n_sl = _w.IntSlider(value={v}, max=10**9)\n_sl")
        self.latency["widget"].append(c.done - c.sent)
        opens = [m for m in c.of_type("comm_open")
                 if m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"]
        views = [m["content"]["data"].get("application/vnd.jupyter.widget-view+json", {})
                 for m in c.of_type("execute_result", "display_data")]
        if not self.check("widget", c, len(opens) == 1
                          and opens[0]["content"]["data"]["state"]["value"] == v
                          and any(x.get("model_id") == opens[0]["content"]["comm_id"] for x in views),
                          f"{len(opens)} IntSlider comm_opens, views {views}"):
            return
        comm_id = opens[0]["content"]["comm_id"]
        v2 = self.rng.randrange(10**6)
        self.send_comm_msg(comm_id, {"method": "update", "state": {"value": v2},
                                     "buffer_paths": []})
        d = self.rng.randrange(1, 1000)
        c = self.run(f"_sl.value = _sl.value + {d}\nprint('w', {nonce}, _sl.value)")
        self.latency["widget"].append(c.done - c.sent)
        updates = [m["content"]["data"].get("state", {}).get("value") for m in c.of_type("comm_msg")
                   if m["content"]["comm_id"] == comm_id]
        if not self.check("widget", c, c.stream("stdout") == f"w {nonce} {v2 + d}\n"
                          and bool(updates) and updates[-1] == v2 + d,
                          f"stdout {c.stream('stdout')!r} (wanted the frontend's {v2} + {d}), "
                          f"updates {updates}"):
            return
        c = self.run("_sl.close()")
        self.latency["widget"].append(c.done - c.sent)
        closes = [m for m in c.of_type("comm_close") if m["content"]["comm_id"] == comm_id]
        self.check("widget", c, len(closes) == 1, f"{len(closes)} comm_close for the slider")

    def cell_error(self, nonce: int) -> None:
        c = self.run(f"print('e', {nonce})\nraise ValueError('bad {nonce}')")
        self.latency["error"].append(c.done - c.sent)
        reply = c.reply or {}
        errors = c.of_type("error")
        ok = (reply.get("status") == "error" and reply.get("ename") == "ValueError"
              and reply.get("evalue") == f"bad {nonce}" and len(errors) == 1
              and errors[0]["content"]["evalue"] == f"bad {nonce}"
              and c.stream("stdout") == f"e {nonce}\n")
        if ok:
            self.expected["error: ValueError"] += 1
        self.check("error", c, ok, f"reply {reply.get('status')} {reply.get('ename')} "
                   f"{reply.get('evalue')!r}, {len(errors)} IOPub errors, stdout "
                   f"{c.stream('stdout')!r}", expect_ok=False)

    def cell_input(self, nonce: int) -> None:
        v = self.rng.randrange(10**9)
        c = self.run(f"_x = input('in{nonce}? ')\nprint('got', int(_x) * 2)",
                     on_input=lambda req: str(v))
        self.latency["input"].append(c.done - c.sent)
        prompts = [r.get("prompt") for r in c.input_requests]
        self.check("input", c, prompts == [f"in{nonce}? "] and c.stream("stdout") == f"got {2 * v}\n",
                   f"prompts {prompts}, stdout {c.stream('stdout')!r}")

    def _sleeping_cell(self, kind: str, nonce: int, action: Callable[[], None],
                       delay: float) -> Cell:
        """A cell printing a marker then sleeping; `action` fires `delay` s after the marker."""
        marker = f"{kind[0]}{nonce}\n"

        def on_msg(cell: Cell, msg: dict) -> None:
            if cell.action_at is None and marker in cell.stream("stdout"):
                cell.action_at = time.monotonic() + delay

        c = Cell("")
        try:
            c = self.run(f"print('{marker.strip()}', flush=True)\nimport time\ntime.sleep(600)",
                         timeout=CELL_TIMEOUT + AFTER_INTERRUPT, on_msg=on_msg, action=action)
        finally:
            if c.action_at is not None and c.done:
                self.latency[kind].append(c.done - c.action_at)
        ename = (c.reply or {}).get("ename")
        want = EXPECTED_ENAMES[kind]
        if (c.reply or {}).get("status") == "error" and ename == want:
            self.expected[f"{kind}: {ename}"] += 1
        else:
            self.errors[f"{kind}: {ename or (c.reply or {}).get('status')}"] += 1
        ok = (c.reply or {}).get("status") == "error" and ename == want \
            and c.stream("stdout") == marker
        self.check(kind, c, ok, f"status {(c.reply or {}).get('status')} {ename} (wanted {want}): "
                   f"{(c.reply or {}).get('evalue', '')[:300]!r}; stdout "
                   f"{c.stream('stdout')[:200]!r}", expect_ok=False)
        return c

    def cell_interrupt(self, nonce: int) -> None:
        c = self._sleeping_cell("interrupt", nonce, self.interrupt,
                                self.rng.uniform(0.1, 1.5))
        if c.action_at is None:
            self.lose("interrupt", "the marker never came, so no interrupt was sent")
        self.cell_small(nonce + 1)  # the kernel must carry on

    def cell_snapshot(self, nonce: int) -> None:
        slot = f"soak{self.snap_slot % 2}"
        self.snap_slot += 1
        c = self.run(f"_snapv = {nonce}")
        if not self.check("snapshot", c, True, ""):
            return
        c = self.run(f"%snapshot --force {slot}")
        self.latency["%snapshot"].append(c.done - c.sent)
        if not self.check("snapshot", c, slot in c.texts(), f"%snapshot said {c.texts()[:300]!r}"):
            return
        c = self.run("_snapv = -1")
        if not self.check("snapshot", c, True, ""):
            return
        c = self.run(f"%restore {slot}")
        self.latency["%restore"].append(c.done - c.sent)
        if not self.check("snapshot", c, True, ""):
            return
        c = self.run("_snapv")
        self.check("snapshot", c, c.result() == str(nonce),
                   f"after %restore _snapv is {c.result()!r}, wanted {nonce}")

    def cell_idle(self, nonce: int) -> None:
        c = self.run(f"_idlev = {nonce}")
        if not self.check("idle", c, True, ""):
            return
        t0 = time.monotonic()
        while self._qemus():
            if time.monotonic() - t0 > self.idle_suspend + 120:
                self.lose("idle", f"not suspended {time.monotonic() - t0:.0f} s after its last "
                          f"cell (idle_suspend_after={self.idle_suspend:g})")
                return
            time.sleep(0.5)
        self.latency["idle: suspended after (s)"].append(time.monotonic() - t0)
        self._drain(time.monotonic() + 0.2, None)  # a suspend must say nothing on IOPub
        c = self.run("_idlev")
        self.latency["idle: first cell after suspend"].append(c.done - c.sent)
        self.check("idle", c, c.result() == str(nonce),
                   f"after the suspend _idlev is {c.result()!r}, wanted {nonce}")

    def _qemus(self) -> list[int]:
        """The kernel's live QEMU processes (a zombie its parent has not reaped does not count)."""
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in procs:
            try:
                if p.name().startswith("qemu-system") and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.NoSuchProcess:
                continue
        return out

    def cell_death(self, nonce: int) -> None:
        c = self.run("%vm")
        found = re.search(r"QEMU pid (\d+)", c.texts())
        if not self.check("death", c, found is not None, f"%vm said {c.texts()[:300]!r}"):
            return
        assert found is not None
        qemu = int(found.group(1))
        kids = {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        if qemu not in kids:
            self.lose("death", f"%vm names QEMU pid {qemu}, not a process of this kernel")
            return
        c = self.run(f"_alive = {nonce}")
        self.check("death", c, True, "")

        def kill() -> None:
            try:
                os.kill(qemu, signal.SIGKILL)
                self.log(f"killed QEMU {qemu}")
            except ProcessLookupError:
                self.lose("death", f"QEMU {qemu} was gone before the kill")

        self._sleeping_cell("death", nonce, kill, self.rng.uniform(0.1, 1.5))
        c = self.run("_alive")
        if (c.reply or {}).get("ename") == "NameError":
            self.expected["death: NameError after (fresh VM)"] += 1
        else:
            self.lose("death", f"after the guest's death `_alive` gave {c.reply} {c.result()!r}, "
                      "wanted a NameError (a fresh VM)")
        self.cell_small(nonce + 1)

    # ---- the thread ---------------------------------------------------------------------------
    def sample(self) -> None:
        try:
            p = psutil.Process(self.pid)
            rss, fds = p.memory_info().rss, p.num_fds()
        except psutil.Error:
            return
        qemus = self._qemus()
        self.qemu_seen.update(qemus)
        self.samples.append(Sample(time.monotonic(), rss, fds, len(qemus)))

    def main(self) -> None:
        try:
            t0 = time.monotonic()
            self.kc = self.km.client()
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=600)
            self.ready_s = time.monotonic() - t0
            # the replies to wait_for_ready's kernel_info requests, the starting status
            self._drain(time.monotonic() + 0.5, None, discard=True)
            self.ours.clear()
            self.started = time.monotonic()
            # The first cell waits for the kernel's first VM: timed apart from the kinds.
            c = self.run("21 * 2")
            self.cells += 1
            self.latency["first cell (VM ready)"].append(c.done - c.sent)
            self.check("first", c, c.result() == "42", f"result {c.result()!r}")
            end = self.started + self.minutes * 60
            self.death_at = self.started + self.minutes * 60 * self.rng.uniform(0.3, 0.7)
            died = "death" not in self.weights  # --skip death
            kinds = [k for k, w in self.weights.items() if w]
            weights = [self.weights[k] for k in kinds]
            while time.monotonic() < end:
                if not died and time.monotonic() >= self.death_at:
                    kind, died = "death", True
                else:
                    kind = self.rng.choices(kinds, weights)[0]
                nonce = self.rng.randrange(10**6, 10**9)
                before = len(self.ours)
                self.log(f"{kind} {nonce}")
                try:
                    getattr(self, f"cell_{kind}")(nonce)
                except CellTimeout as e:
                    self.errors[f"{kind}: timeout"] += 1
                    self.lose(kind, f"timed out: {e}")
                    if not self.recover():
                        self.stuck = f"{kind} cell: {e}; an interrupt did not end it"
                        break
                finally:
                    self.cells += len(self.ours) - before
                    self.by_kind[kind] += 1
                if self.think:
                    time.sleep(self.rng.uniform(0, 2 * self.think))
            if not died and self.stuck is None:
                self.cell_death(self.rng.randrange(10**6, 10**9))  # a run too short to reach it
                self.by_kind["death"] += 1
            self._drain(time.monotonic() + 2.0, None)  # anything late?
        except Exception:  # noqa: BLE001 - a bench bug or a dead channel: report it, carry on
            self.crash = traceback.format_exc()
            print(f"[k{self.index}] CRASHED:\n{self.crash}", flush=True)
        finally:
            self.ended = time.monotonic()

    def recover(self) -> bool:
        """After a timeout: interrupt, and wait for whatever ends the cell."""
        self.interrupt()
        try:
            self.run("1+1", timeout=AFTER_INTERRUPT)
            return True
        except CellTimeout:
            return False

    def shutdown(self) -> None:
        try:
            if self.kc is not None:
                self.kc.stop_channels()
            self.km.shutdown_kernel(now=self.stuck is not None)
        except Exception as e:  # noqa: BLE001
            print(f"[k{self.index}] shutdown failed: {e}", flush=True)


def list_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
        if not dirnames and not filenames and dirpath != root:
            out.append(os.path.relpath(dirpath, root) + "/")
    return sorted(out)


def du_mib(root: str) -> float:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--think", type=float, default=0.2,
                    help="mean pause between cells, seconds (uniform 0..2x)")
    ap.add_argument("--pool-min", type=int, default=None,
                    help="c.MicroVMKernel.pool_min (default: the kernel's default)")
    ap.add_argument("--kernel-arg", action="append", default=[],
                    help="extra kernel command-line argument (repeatable)")
    ap.add_argument("--idle-suspend", type=float, default=0.0, metavar="S",
                    help="c.MicroVMKernel.idle_suspend_after = S and the 'idle' cell kind "
                    "(default 0: the kernel's own setting, no idle cells)")
    ap.add_argument("--skip", action="append", default=[], choices=[*WEIGHTS, "death", "idle"],
                    help="leave out a cell kind (repeatable)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--verbose", action="store_true", help="log every cell")
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="smk-bench-soak-")
    prefix, runtime, data, tmp, cwd, conn = (
        os.path.join(root, d) for d in ("prefix", "xdg-runtime", "data", "tmp", "cwd", "conn"))
    for path in (runtime, data, tmp, cwd, conn):
        os.makedirs(path, mode=0o700)
    extra = list(args.kernel_arg)
    if args.idle_suspend:
        extra.append(f"--MicroVMKernel.idle_suspend_after={args.idle_suspend:g}")
    if args.pool_min is not None:
        extra.append(f"--MicroVMKernel.pool_min={args.pool_min}")
    install(prefix=prefix, kernel_name=KERNEL_NAME, backend="vm", interrupt_mode="message",
            display_name="bench soak", extra_args=extra)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (os.path.join(prefix, "share", "jupyter"), os.environ.get("JUPYTER_PATH")) if p)
    t0 = time.monotonic()
    prepare(KERNEL_NAME)  # bakes the warm snapshot once if it is missing or stale
    print(f"warm snapshot ready ({time.monotonic() - t0:.1f} s); starting {args.kernels} kernels "
          f"x {args.minutes:g} min, seed {args.seed}, kernel args {extra or 'none'}", flush=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime, JUPYTER_DATA_DIR=data, TMPDIR=tmp)
    os.environ["JUPYTER_RUNTIME_DIR"] = conn  # the kernels' connection files (ours to remove)

    drivers: list[Driver] = []
    threads: list[threading.Thread] = []
    stop_sampling = threading.Event()
    loads: list[float] = [os.getloadavg()[0]]  # the host's 1-minute load average, every 5 s
    exit_code = 0
    try:
        for i in range(args.kernels):
            weights = {k: w for k, w in {**WEIGHTS, "death": 0, "idle": IDLE_WEIGHT}.items()
                       if k not in args.skip and (k != "idle" or args.idle_suspend)}
            drivers.append(Driver(i, args.seed, args.minutes, args.think, env, cwd, args.verbose,
                                  weights, args.idle_suspend))
        for d in drivers:
            th = threading.Thread(target=d.main, name=f"soak-k{d.index}", daemon=True)
            th.start()
            threads.append(th)

        def sampler() -> None:
            while not stop_sampling.wait(SAMPLE_EVERY):
                loads.append(os.getloadavg()[0])
                for d in drivers:
                    if d.started and not d.ended:
                        d.sample()

        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        last = time.monotonic()
        while any(th.is_alive() for th in threads):
            for th in threads:
                th.join(timeout=1.0)
            if time.monotonic() - last >= 60:
                last = time.monotonic()
                print(f"... {sum(d.cells for d in drivers)} cells, "
                      f"{sum(len(d.lost) for d in drivers)} lost, "
                      f"{sum(len(d.mixed) for d in drivers)} mixed", flush=True)
        stop_sampling.set()
        sampling.join()
        for d in drivers:
            d.sample()  # the end figure, after the last cell
        snap_files = list_files(os.path.join(data, "supermachine-kernel", "snapshots"))
        snap_mib = du_mib(os.path.join(data, "supermachine-kernel", "snapshots"))
    finally:
        stop_sampling.set()
        shut = [threading.Thread(target=d.shutdown) for d in drivers]
        for th in shut:
            th.start()
        for th in shut:
            th.join()
    time.sleep(2.0)  # the kernels' own exit handlers

    # ---- leftovers ----------------------------------------------------------------------------
    kernels_left = [d.pid for d in drivers if psutil.pid_exists(d.pid)
                    and psutil.Process(d.pid).status() != psutil.STATUS_ZOMBIE]
    qemu_left = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            seen = any(p.info["pid"] in d.qemu_seen for d in drivers)
            ours = runtime in " ".join(p.info["cmdline"] or [])
            if (seen and (p.info["name"] or "").startswith("qemu")) or ours:
                qemu_left.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:150]}")
        except psutil.Error:
            continue
    in_runtime = list_files(runtime)
    stamps = [f for f in in_runtime if f.startswith("supermachine/verified/")]
    leftover = {
        "XDG_RUNTIME_DIR (VM work dirs)": [f for f in in_runtime if f not in stamps],
        "suspend snapshots": list_files(os.path.join(data, "supermachine-kernel", "suspended")),
        "TMPDIR": list_files(tmp),
        "kernel cwd": list_files(cwd),
        "connection files": list_files(conn),
        "JUPYTER_DATA_DIR other": [f for f in list_files(data) if not
                                   f.startswith(("supermachine-kernel/snapshots/",
                                                 "supermachine-kernel/suspended/"))],
    }

    # ---- the report ---------------------------------------------------------------------------
    total = lambda attr: sum(len(getattr(d, attr)) for d in drivers)  # noqa: E731
    cells = sum(d.cells for d in drivers)
    lat: dict[str, list[float]] = collections.defaultdict(list)
    for d in drivers:
        for k, v in d.latency.items():
            lat[k].extend(v)
    errors: collections.Counter = sum((d.errors for d in drivers), collections.Counter())
    expected: collections.Counter = sum((d.expected for d in drivers), collections.Counter())
    by_kind: collections.Counter = sum((d.by_kind for d in drivers), collections.Counter())

    print(f"\n== soak: {args.kernels} kernels x {args.minutes:g} min, seed {args.seed} ==")
    print(f"kernels ready after (s): {', '.join(f'{d.ready_s:.1f}' for d in drivers)}")
    print(f"host load average (1 min) during the run: median {median(loads):.1f}, max "
          f"{max(loads):.1f} on {os.cpu_count()} CPUs")
    print(f"cells run (execute_requests): {cells}; cell kinds drawn: {dict(sorted(by_kind.items()))}")
    print(f"LOST results: {total('lost')}    MIXED messages: {total('mixed')}    "
          f"unparented IOPub messages: {total('unparented')}")
    for d in drivers:
        for x in d.lost[:10]:
            print(f"  k{d.index} lost: {x}")
        for x in d.mixed[:10]:
            print(f"  k{d.index} mixed: {x}")
        for x in d.unparented[:5]:
            print(f"  k{d.index} unparented: {x}")
        if d.stuck:
            print(f"  k{d.index} STUCK: {d.stuck}")
        if d.crash:
            print(f"  k{d.index} driver crashed: {d.crash.strip().splitlines()[-1]}")
    print(f"unexpected errors by kind: {dict(sorted(errors.items())) or 'none'}")
    print(f"expected errors: {dict(sorted(expected.items()))}")

    print(f"\n{'latency (s)':<34} {'n':>5} {'p50':>8} {'p99':>8} {'max':>8}")
    names = {"interrupt": "interrupt (interrupt -> idle)", "death": "death (kill -> idle)"}
    for k in sorted(lat):
        v = lat[k]
        print(f"{names.get(k, k):<34} {len(v):>5} {percentile(v, 50):>8.2f} "
              f"{percentile(v, 99):>8.2f} {max(v):>8.2f}")

    print(f"\n{'kernel':<7} {'RSS 1st min':>12} {'RSS at 1 min':>13} {'RSS end':>10} "
          f"{'growth':>10} {'since 1 min':>12} {'fds 1st':>8} {'fds end':>8} {'QEMUs max':>10} "
          f"{'QEMUs end':>10} {'cells':>6}")
    growth: list[float] = []
    later: list[float] = []
    for d in drivers:
        first = [s for s in d.samples if s.t - d.started <= 60]
        if not first or not d.samples:
            print(f"k{d.index:<6} (no samples)")
            continue
        r0, r60, r1 = median([s.rss for s in first]), first[-1].rss, d.samples[-1].rss
        growth.append(r1 - r0)
        later.append(r1 - r60)
        print(f"k{d.index:<6} {mib(r0):>12} {mib(r60):>13} {mib(r1):>10} {mib(r1 - r0):>10} "
              f"{mib(r1 - r60):>12} {median([s.fds for s in first]):>8.0f} "
              f"{d.samples[-1].fds:>8} {max(s.qemus for s in d.samples):>10} "
              f"{d.samples[-1].qemus:>10} {d.cells:>6}")
    if growth:
        print(f"RSS growth per kernel process, end - median of the first minute: median "
              f"{mib(median(growth))}, max {mib(max(growth))}; end - the sample at 1 min: "
              f"median {mib(median(later))}, max {mib(max(later))}")

    print("\nafter shutdown:")
    print(f"  kernel processes left: {kernels_left or 'none'}")
    print(f"  QEMU processes left: {qemu_left or 'none'} ({sum(len(d.qemu_seen) for d in drivers)} "
          f"QEMU processes seen during the run)")
    for where, files in leftover.items():
        print(f"  files left in {where}: {len(files)}" + (f" {files[:10]}" if files else ""))
    print(f"  %snapshot store (kept by design): {len(snap_files)} files, {snap_mib:.1f} MiB; "
          f"snapshot verification stamps (runtime dir, kept by design): {len(stamps)}")

    bad = (total("lost") or total("mixed") or kernels_left or qemu_left
           or any(leftover.values()) or any(d.stuck or d.crash for d in drivers))
    exit_code = 1 if bad else 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "args": vars(args), "cells": cells, "by_kind": by_kind,
                "lost": [x for d in drivers for x in d.lost],
                "mixed": [x for d in drivers for x in d.mixed],
                "unparented": [x for d in drivers for x in d.unparented],
                "errors": errors, "expected": expected,
                "latency": {k: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
                            for k, v in lat.items()},
                "load": loads, "rss_growth": growth, "rss_growth_after_1min": later, "kernels_left": kernels_left, "qemu_left": qemu_left,
                "leftover": leftover, "snapshots": {"files": len(snap_files), "mib": snap_mib},
                "verification_stamps": len(stamps),
                "stuck": [d.stuck for d in drivers], "crash": [d.crash for d in drivers],
            }, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nresult: {'FAIL' if bad else 'PASS'}")
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
