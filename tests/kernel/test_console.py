"""`jupyter console` smoke test: a terminal frontend runs cells on the kernel."""
from __future__ import annotations

import os
import sys

import pexpect
import pytest

from .harness import KERNEL, SLOW, START_TIMEOUT


def test_jupyter_console_runs_cells():
    console = os.path.join(os.path.dirname(sys.executable), "jupyter-console")
    env = dict(os.environ, TERM="xterm", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(console, ["--kernel", KERNEL, "--simple-prompt", "--no-confirm-exit"],
                          env=env, encoding="utf-8", timeout=START_TIMEOUT, dimensions=(40, 200))
    try:
        child.expect(r"In \[1\]: ")
        child.sendline("print(6 * 7)")
        child.expect("42", timeout=30 * SLOW)
        child.expect(r"In \[2\]: ")
        child.sendline("'abc'.upper()")
        child.expect(r"Out\[2\]: 'ABC'", timeout=30 * SLOW)
        child.expect(r"In \[3\]: ")
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60 * SLOW)
    except pexpect.ExceptionPexpect:  # show what the console printed
        pytest.fail(f"console transcript:\n{child.before}")
    finally:
        child.close(force=True)
