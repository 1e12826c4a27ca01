"""Fixtures for the runtime tests.

* ``unix_vm``: the real guest agent in ``--listen-unix`` mode on the host (no QEMU): fast.
* ``image`` / ``qemu_vm``: the default guest image (built by ``make setup``; this only looks
  it up) and one cold-booted microVM shared by the tests that do not disturb it.
* ``vm``: parametrised over both, for tests of the protocol operations.

When a test using a real VM fails, the tail of its guest console is printed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supermachine_kernel import api

REPO = Path(__file__).resolve().parents[2]


def agent_binary() -> Path:
    """The guest agent: the packaged static build, else any cargo build of it."""
    candidates = [
        REPO / "supermachine_kernel" / "guest" / "supermachine-agent",
        REPO / "core" / "target" / "x86_64-unknown-linux-gnu" / "release" / "supermachine-agent",
        REPO / "core" / "target" / "release" / "supermachine-agent",
        REPO / "core" / "target" / "debug" / "supermachine-agent",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("no supermachine-agent binary: run `make setup` (or `cd core && cargo build -p supermachine-agent`)")


class UnixAgent:
    """An agent process serving on a unix socket in a private temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sm-agent-"))
        self.sock = self.dir / "agent.sock"
        self.proc = subprocess.Popen(
            [str(agent_binary()), "--listen-unix", str(self.sock), "--state-dir", str(self.dir / "state")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "agent.log", "wb"),
        )

    def attach(self) -> api.Vm:
        return api.Vm.attach_unix(self.sock, timeout=10)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def unix_agent():
    a = UnixAgent()
    yield a
    a.stop()


@pytest.fixture(scope="session")
def unix_vm(unix_agent):
    vm = unix_agent.attach()
    yield vm
    vm.release()



def console_tail(vm: api.Vm, n: int = 40) -> str:
    try:
        text = vm.console_tail()
    except Exception as e:  # noqa: BLE001 - a released VM; this only decorates a failure
        return f"(no console: {e})"
    if text is None:
        return "(no QEMU, no console)"
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="session")
def qemu_vm(image):
    vm = image.boot()
    yield vm
    vm.release()


@pytest.fixture
def fresh_vm(image, request):
    """A VM of its own, for tests that kill or break it."""
    vm = image.boot()
    yield vm
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        sys.stderr.write(f"\n--- guest console of {vm.id} ---\n{console_tail(vm)}\n")
    vm.release()


@pytest.fixture(params=["unix", "qemu"])
def vm(request):
    """Both backends: the agent over a unix socket, and a real microVM."""
    v = request.getfixturevalue(f"{request.param}_vm")
    yield v
    if request.param == "qemu" and getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        sys.stderr.write(f"\n--- guest console ---\n{console_tail(v)}\n")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
