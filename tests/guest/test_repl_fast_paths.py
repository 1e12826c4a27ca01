"""The guest REPL's shortcuts for small cells give exactly what the long way gives: a held
result leaves with the next frame, the flusher's tick does not split a line being written, the
scalar display path matches IPython's formatter, and the token-transform and cleanup skips match
IPython's transformer manager (guest/repl.py)."""
from __future__ import annotations

import json
import os
import select
import struct
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("IPython")
from IPython.core.formatters import DisplayFormatter  # noqa: E402
from IPython.core.inputtransformer2 import TransformerManager  # noqa: E402


def _frames(data: bytes) -> list[dict]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


def _read_available(fd: int, wait: float) -> bytes:
    data = b""
    while select.select([fd], [], [], wait)[0]:
        data += os.read(fd, 65536)
        wait = 0.05
    return data


def test_a_held_frame_leaves_in_one_write_with_the_next(repl):
    r, w = os.pipe()
    try:
        channel = repl.Channel(os.open(os.devnull, os.O_RDONLY), w)
        channel.send({"type": "execute_result", "n": 1}, hold=True)
        assert _read_available(r, 0.2) == b""  # kept back
        channel.send({"type": "reply", "id": 7})
        data = os.read(r, 65536)  # one write carries both, in order
        assert [m["type"] for m in _frames(data)] == ["execute_result", "reply"]
        channel.send({"type": "execute_result", "n": 2}, hold=True)
        channel.send({"type": "execute_result", "n": 3}, hold=True)  # the first one goes now
        assert [m.get("n") for m in _frames(_read_available(r, 1.0))] == [2]
        channel.release_held()  # what the flusher does every FLUSH_INTERVAL
        assert [m.get("n") for m in _frames(_read_available(r, 1.0))] == [3]
        channel.release_held()
        assert _read_available(r, 0.1) == b""
    finally:
        os.close(r)


def test_the_flusher_tick_sends_only_text_that_has_waited(repl):
    sent = []
    channel = SimpleNamespace(send_stream=lambda name, data: sent.append(
        {"type": "stream", "name": name, "text": data.decode()}))
    buffer = repl.StreamBuffer(channel, "stdout")
    buffer.write("a")  # print('a') writes the text, then the newline
    buffer.flush_waited(0.5)  # a tick between the two writes: too fresh to send
    assert sent == []
    buffer.write("\n")
    time.sleep(0.2)
    buffer.flush_waited(0.1)  # the next tick: the whole line, in one message
    assert sent == [{"type": "stream", "name": "stdout", "text": "a\n"}]
    buffer.flush_waited(0.0)  # nothing waits any more
    buffer.write("b")
    buffer.flush()  # an explicit flush (before a reply) sends whatever is there
    assert [m["text"] for m in sent] == ["a\n", "b"]


@pytest.mark.parametrize("value", [2, -7, 10**40, 3.25, float("nan"), 1 + 2j, True, False,
                                   "text", "x" * 5000, b"\x00bytes", "", "a\nb\u2028c\x85'\"",
                                   b"\n\x0b", 0, -(2**63)])
def test_scalar_display_matches_ipython(repl, value):
    reference = DisplayFormatter()
    fast = DisplayFormatter()
    repl.install_scalar_fast_path(fast)
    assert fast.format(value) == reference.format(value)


def test_scalar_display_defers_to_registered_printers(repl):
    fast = DisplayFormatter()
    repl.install_scalar_fast_path(fast)
    fast.formatters["text/html"].for_type(int, lambda n: f"<b>{n}</b>")
    data, _ = fast.format(5)
    assert data == {"text/plain": "5", "text/html": "<b>5</b>"}
    assert fast.format(True)[0]["text/html"] == "<b>True</b>"  # bool is an int
    fast.formatters["text/latex"].for_type_by_name("builtins", "float", lambda x: "$x$")
    assert fast.format(1.5)[0]["text/latex"] == "$x$"
    fast.formatters["text/plain"].float_precision = "%.2f"  # %precision still applies
    assert fast.format(3.14159)[0]["text/plain"] == "3.14"


def test_scalar_plain_text_follows_the_plain_formatter(repl):
    reference = DisplayFormatter()
    fast = DisplayFormatter()
    repl.install_scalar_fast_path(fast)
    # An int too long to print: IPython's formatter reports the error the same way.
    assert fast.format(10**5000) == reference.format(10**5000)
    for formatter in (reference, fast):  # %pprint off
        formatter.formatters["text/plain"].pprint = False
    assert fast.format("x\ny") == reference.format("x\ny")
    for formatter in (reference, fast):  # printers registered for the plain formatter
        formatter.formatters["text/plain"].pprint = True
        plain = formatter.formatters["text/plain"]
        plain.for_type(int, lambda n, p, cycle: p.text(f"int:{n}"))
        plain.singleton_printers[id(True)] = lambda obj, p, cycle: p.text("yes")
        plain.deferred_printers[("builtins", "bytes")] = lambda b, p, cycle: p.text("some bytes")
        plain.type_printers.pop(bytes)
    for value in (5, True, False, b"x", "x"):
        assert fast.format(value) == reference.format(value), value
    assert fast.format(5)[0] == {"text/plain": "int:5"}
    assert fast.format(True)[0] == {"text/plain": "yes"}
    assert fast.format(b"x")[0] == {"text/plain": "some bytes"}


def test_scalar_subclasses_take_the_long_way(repl):
    class Sub(int):
        def _repr_html_(self):
            return "<i>sub</i>"

    fast = DisplayFormatter()
    repl.install_scalar_fast_path(fast)
    assert fast.format(Sub(3))[0] == {"text/plain": "3", "text/html": "<i>sub</i>"}


CELLS = [
    "1+1", "a = 1\nb = a, 2\n", "print('x; y, z')", "def f(x):\n    return x / 2\n",
    "%time 1+1", "x = %pwd", "!ls", "files = !ls", "len?", "f??", "a = 10 % 3",
    "/print 1", ",f a b", ";f a b", "  /print 2", "x = 1 if y else 2", "s = '?'",
    "d = {'a': 1}\nd['a']\n", "%%bash\necho hi\n", "   \n\nx = [1,\n, 2]\n",
]
# Cells for the cleanup passes: indents, blank lines, prompts, doctests, line endings.
CLEANUP_CELLS = CELLS + [
    "x = 1", "x = 1\n", "\nx = 1\n", "\tx = 1\n", "  x = 1\n  y = 2\n", "x = 1\n   \ny = 2\n",
    "s = '''\n  \t\n'''\n", "x = 1\r\ny = 2\r\n", ">>> x = 1\n>>> x\n", "x = 1\n... y\n",
    "In [1]: x = 1\n", "   ...: y = 2\n", "print('In [1]')\n", "a = ...\n", "  >>> 1\n",
    'def f():\n    """\n    >>> f()\n    """\n', "%%time\nx = 1\n", "%%timeit?\n",
    "if x:\n    pass\n\n", "\x0cx = 1\n", "x = 1\n\x0c\n", "",
]


@pytest.mark.parametrize("cell", CELLS)
def test_token_skip_matches_ipython(repl, cell):
    reference = TransformerManager()
    fast = TransformerManager()
    repl.install_token_fast_path(fast)
    assert fast.transform_cell(cell) == reference.transform_cell(cell)
    assert fast.check_complete(cell) == reference.check_complete(cell)


@pytest.mark.parametrize("cell", CLEANUP_CELLS)
def test_cleanup_skip_matches_ipython(repl, cell):
    reference = TransformerManager()
    fast = TransformerManager()
    repl.install_token_fast_path(fast)
    repl.install_cleanup_fast_path(fast)
    assert fast.transform_cell(cell) == reference.transform_cell(cell)


def test_cleanup_skip_steps_aside_for_user_passes(repl):
    fast = TransformerManager()
    repl.install_cleanup_fast_path(fast)
    fast.cleanup_transforms.append(lambda lines: [line.replace("one", "1") for line in lines])
    assert fast.transform_cell("x = one") == "x = 1\n"
    late = TransformerManager()
    late.line_transforms.append(lambda lines: lines + ["y = 2\n"])
    repl.install_cleanup_fast_path(late)  # not installed over a user's pass
    assert late.transform_cell("x = 1") == "x = 1\ny = 2\n"


def test_token_skip_steps_aside_for_user_transformers(repl):
    fast = TransformerManager()
    repl.install_token_fast_path(fast)

    class Shout:
        @classmethod
        def find(cls, tokens_by_line):
            for line in tokens_by_line:
                for tok in line:
                    if tok.string == "hello":
                        return cls(tok.start)
            return None

        def __init__(self, start):
            self.start_line, self.start_col = start[0] - 1, start[1]
            self.priority = 10

        def transform(self, lines):
            lines = list(lines)
            lines[self.start_line] = lines[self.start_line].replace("hello", "'HELLO'")
            return lines

    fast.token_transformers.append(Shout)
    assert fast.transform_cell("hello") == "'HELLO'\n"
