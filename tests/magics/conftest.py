"""Magic tests: real kernels (jupyter_client) whose snapshot store is a temporary Jupyter data dir.

The kernel harness is the kernel tests' (tests/kernel/harness.py). Kernels get their own
kernelspec, `smk-magics` (installed into a private prefix added to JUPYTER_PATH), without warm
spares (on 2 cores a background restore per test kernel slows everything down). The notebook a
kernel serves is named through JPY_SESSION_NAME, as Jupyter Server does (or not at all, as with
nbclient or jupyter console); every kernel's JUPYTER_DATA_DIR is a temporary directory, so
nothing touches the user's snapshots.

Most tests need the vm backend (a local-process guest has no VM to snapshot): they are skipped
on SUPERMACHINE_TEST_BACKEND=local and marked `vm` otherwise.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, Kernel, LocalKernelspecs, stderr_of, stdout_of  # noqa: E402

from supermachine_kernel.machine.snapshot_store import (  # noqa: E402
    SnapshotStore,
    kernel_id,
    notebook_key,
)

KERNEL = "smk-magics"
_SPECS = LocalKernelspecs("magics", {KERNEL: []})


def use_kernelspec() -> None:
    """Puts our kernelspec on JUPYTER_PATH (other conftests may have replaced it since)."""
    _SPECS.use()


use_kernelspec()



def needs_vm(test):
    """For tests that start their own kernels: skipped without the vm backend."""
    return pytest.mark.vm(pytest.mark.skipif(BACKEND != "vm", reason="snapshots need the vm "
                                             "backend")(test))


__all__ = ["KERNEL", "MagicKernel", "needs_vm", "stdout_of", "stderr_of", "use_kernelspec"]


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    if BACKEND == "vm":
        for item in items:
            if str(item.fspath).startswith(here) and "kernel" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.vm)


class MagicKernel(Kernel):
    """A kernel serving notebook ``notebook`` with snapshots under ``data_dir``; without a
    notebook (None) it is started the way a plain jupyter_client frontend does it."""

    def __init__(self, data_dir: str, notebook: str | None = "analysis.ipynb",
                 extra_arguments: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.notebook = notebook
        use_kernelspec()
        env = dict(os.environ, JUPYTER_DATA_DIR=data_dir)
        env.pop("JPY_SESSION_NAME", None)
        if notebook is not None:
            env["JPY_SESSION_NAME"] = notebook
        super().__init__(KERNEL, extra_arguments=extra_arguments, env=env)

    def store(self):
        """This kernel's notebook folder, as the kernel should compute it: from the notebook's
        name, else from the connection file and session key its KernelManager holds."""
        env = {"JPY_SESSION_NAME": self.notebook} if self.notebook is not None else {}
        kid = kernel_id(self.km.connection_file, self.km.session.key)
        key, label = notebook_key(env, os.getcwd(), kid, "")
        root = os.path.join(self.data_dir, "supermachine-kernel", "snapshots")
        return SnapshotStore(root).notebook(key, label)

    def ok(self, code: str, timeout: float = 60) -> str:
        """Runs ``code``, asserts it succeeded, returns its stdout."""
        reply, outputs = self.execute(code, timeout=timeout)
        assert reply["status"] == "ok", (code, reply, stderr_of(outputs))
        return stdout_of(outputs)

    def error(self, code: str, timeout: float = 60) -> tuple[dict, list[dict]]:
        """Runs ``code``, asserts it failed; returns (reply, the published error's content)."""
        reply, outputs = self.execute(code, timeout=timeout)
        assert reply["status"] == "error", (code, reply)
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        assert errors, outputs
        return reply, errors


@pytest.fixture(scope="module")
def data_dir():
    with tempfile.TemporaryDirectory(prefix="smk-jupyter-data-") as d:
        yield d


@pytest.fixture(scope="module")
def kernel(data_dir, request):
    """One kernel per test module, serving a notebook named after the module."""
    if BACKEND != "vm":
        pytest.skip("snapshots need the vm backend")
    name = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "") + ".ipynb"
    k = MagicKernel(data_dir, notebook=name)
    yield k
    k.shutdown()
