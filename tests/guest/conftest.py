"""Fixtures shared by the session tests."""
from __future__ import annotations

import importlib.util

import pytest

from supermachine_kernel.repl_client.backend import GUEST_DRIVER


@pytest.fixture(scope="module")
def repl(request):
    """The guest REPL driver (guest/repl.py) loaded on the host as a fresh module, one per test
    module, so its classes can be driven without a VM."""
    name = "guest_repl_under_test_" + request.module.__name__.rsplit(".", 1)[-1]
    spec = importlib.util.spec_from_file_location(name, GUEST_DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
