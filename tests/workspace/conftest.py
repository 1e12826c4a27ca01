"""Fixtures for the workspace tests: the real guest agent on a unix socket (its exec runs on
the host, so the transfer's guest scripts and the agent file API run for real without QEMU),
and a guest workspace directory for it."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime.conftest import UnixAgent

from supermachine_kernel import api


@pytest.fixture(scope="module")
def agent_vm() -> Iterator[api.Vm]:
    agent = UnixAgent()
    vm = agent.attach()
    yield vm
    vm.release()
    agent.stop()


@pytest.fixture
def guest_root(tmp_path: Path) -> Path:
    g = tmp_path / "guest-ws"
    g.mkdir()
    return g
