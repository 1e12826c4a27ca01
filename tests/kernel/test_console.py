"""`jupyter console` smoke test: a terminal frontend runs cells on the kernel."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import pexpect
import pytest

from .harness import KERNEL, SLOW, START_TIMEOUT


def _console() -> pexpect.spawn:
    console = os.path.join(os.path.dirname(sys.executable), "jupyter-console")
    env = dict(os.environ, TERM="xterm", PYTHONUNBUFFERED="1")
    return pexpect.spawn(console, ["--kernel", KERNEL, "--simple-prompt", "--no-confirm-exit"],
                         env=env, encoding="utf-8", timeout=START_TIMEOUT, dimensions=(40, 200))


@contextlib.contextmanager
def _transcript_on_failure(child: pexpect.spawn) -> Iterator[None]:
    try:
        yield
    except pexpect.ExceptionPexpect:  # show what the console printed
        pytest.fail(f"console transcript:\n{child.before}")
    finally:
        child.close(force=True)


def test_jupyter_console_runs_cells():
    child = _console()
    with _transcript_on_failure(child):
        child.expect(r"In \[1\]: ")
        child.sendline("print(6 * 7)")
        child.expect("42", timeout=30 * SLOW)
        child.expect(r"In \[2\]: ")
        child.sendline("'abc'.upper()")
        child.expect(r"Out\[2\]: 'ABC'", timeout=30 * SLOW)
        child.expect(r"In \[3\]: ")
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60 * SLOW)


def test_input_in_the_first_cell_typed_ahead():
    """The first cell, typed before the prompt (or piped), calls input(): it reaches the
    kernel while it still starts, and jupyter console takes any idle status of its session
    for the end of that cell. It used to read the idle that followed the kernel_info reply,
    stop waiting for the input_request and hang (5 of 5 runs); startup/responder.py now
    publishes the kept request's busy at once."""
    child = _console()
    with _transcript_on_failure(child):
        child.sendline('x = input("name? ")')  # typed ahead: sent as soon as the console starts
        child.expect(r"name\? ", timeout=60 * SLOW)
        child.sendline("Ada")
        child.expect(r"In \[2\]: ", timeout=60 * SLOW)
        child.sendline("print('hi', x)")
        child.expect("hi Ada", timeout=30 * SLOW)
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60 * SLOW)
