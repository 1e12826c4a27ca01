"""The extension's jest unit tests (labextension/src/__tests__: the panel's state logic), run
from pytest so `make test` runs them."""
from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import LABEXT, NODE_MODULES


def test_jest_unit_tests_pass():
    jest = NODE_MODULES / ".bin" / "jest"
    if not jest.exists():
        pytest.fail("labextension/node_modules has no jest: make setup runs npm ci there")
    run = subprocess.run([str(jest), "--ci", "--colors=false"], cwd=LABEXT, capture_output=True,
                         text=True, timeout=600)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    m = re.search(r"Tests:\s+(\d+) passed, (\d+) total", text)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, text[-2000:]
