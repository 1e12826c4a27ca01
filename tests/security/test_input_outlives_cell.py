"""Issue 16 item 2: input() requests cannot outlive the cell that made them.

A cell starts 50 threads that all call input() and ends, once three got their answer, while
the others still wait. The
frontend answers what it is asked during the cell; after the cell's reply no input_request for
it may arrive, every thread's input() has returned or raised EOFError, and the next cell's
input() gets its own answer (no stale reply is taken for it). Through a real kernel with
jupyter_client.
"""
from __future__ import annotations

import queue
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, SLOW, Kernel, LocalKernelspecs, stdout_of

KERNEL = "smk-security-input"
_SPECS = LocalKernelspecs("input", {KERNEL: []})

pytestmark = [pytest.mark.vm] if BACKEND == "vm" else []

THREADS = 50

ANSWERED = 3  # the cell ends once this many threads got their answer

ASK_FROM_THREADS = f"""
import threading, time
ANSWERED = {ANSWERED}
results = []
def ask(i):
    try:
        results.append(("ok", i, input("q%d " % i)))
    except BaseException as e:
        results.append((type(e).__name__, i, str(e)))
threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range({THREADS})]
for t in threads:
    t.start()
deadline = time.monotonic() + 120
while sum(r[0] == "ok" for r in results) < ANSWERED and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def kernel():
    _SPECS.use()
    k = Kernel(KERNEL)
    yield k
    k.shutdown()


def test_input_requests_end_with_their_cell(kernel):
    k = kernel
    asked: list[str] = []

    def answer(req: dict) -> str:
        asked.append(req["content"]["prompt"])
        return "answer-" + req["content"]["prompt"].split()[0]

    idle_at = []

    def watch(msg: dict) -> None:
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle_at.append(msg["header"]["date"])

    reply, _ = k.execute(ASK_FROM_THREADS, allow_stdin=True, on_input=answer, on_iopub=watch,
                         timeout=200)
    assert reply["status"] == "ok", reply
    answered = len(asked)
    assert ANSWERED <= answered < THREADS, asked

    # Requests are asked one at a time: at most one was left unanswered when the cell ended,
    # sent before it ended; none is sent after.
    unanswered = []
    deadline = time.monotonic() + 5 * SLOW
    while time.monotonic() < deadline:
        try:
            unanswered.append(k.kc.stdin_channel.get_msg(timeout=0.2))
        except queue.Empty:
            pass
    assert len(unanswered) <= 1, [m["content"] for m in unanswered]
    late = [m for m in unanswered if m["header"]["date"] >= idle_at[0]]
    assert late == [], [m["content"] for m in late]

    # Every thread is done: answered ones got their own answer, the rest EOFError.
    out = stdout_of(k.execute(
        "for t in threads: t.join(10)\n"
        "print(sum(t.is_alive() for t in threads), len(results))\n"
        "print(sorted(set(kind for kind, _, _ in results)))\n"
        "print(sum(v == 'answer-q%d' % i for kind, i, v in results if kind == 'ok'),"
        " sum(kind == 'ok' for kind, _, _ in results))\n"
        "print([v for kind, _, v in results if kind != 'ok'][:1])\n",
        timeout=120)[1])
    lines = out.splitlines()
    assert lines[0] == f"0 {THREADS}", out
    kinds = set(eval(lines[1]))
    assert kinds <= {"ok", "EOFError"}, out
    # each answer reached the thread it was for; an answer may come too late for its cell
    ok, total_ok = map(int, lines[2].split())
    assert ok == total_ok and ANSWERED <= ok <= answered, out
    if "EOFError" in kinds:
        assert "the cell that called input() has finished" in lines[3], out
    print(f"\n{THREADS} threads called input(): {answered} answered during the cell, "
          f"{len(late)} input_requests after its reply")

    # The next cell's input() is answered with its own value.
    reply, outputs = k.execute("print(input('next? '))", allow_stdin=True,
                               on_input=lambda req: "fresh", timeout=60)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == "fresh\n"


def test_input_after_the_cell_from_a_leftover_thread_raises(kernel):
    """A thread that calls input() once its cell is over gets an error, and the frontend is
    never asked."""
    k = kernel
    reply, _ = k.execute(
        "import threading, time\n"
        "late_result = []\n"
        "def late():\n"
        "    time.sleep(2)\n"
        "    try:\n"
        "        late_result.append(input('late? '))\n"
        "    except BaseException as e:\n"
        "        late_result.append(type(e).__name__)\n"
        "late_thread = threading.Thread(target=late, daemon=True)\n"
        "late_thread.start()\n",
        allow_stdin=True, on_input=lambda req: "should not be asked", timeout=60)
    assert reply["status"] == "ok", reply
    asked = []
    deadline = time.monotonic() + 3 + 3 * SLOW
    while time.monotonic() < deadline:
        try:
            asked.append(k.kc.stdin_channel.get_msg(timeout=0.2))
        except queue.Empty:
            pass
    assert asked == []
    out = stdout_of(k.execute("late_thread.join(30); print(late_result)", timeout=60)[1])
    assert out.strip() in ("['StdinNotImplementedError']", "['EOFError']"), out
