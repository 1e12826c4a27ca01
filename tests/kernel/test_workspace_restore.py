"""What %restore and a kernel restart do with workspace files, through a real kernel: the guest
comes back with its files of the snapshot's time (or none, after a restart) and is synced with
the notebook's directory at once; nothing on the host is lost (kernel/workspace_hook.py)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import BACKEND, Kernel, stderr_of, stdout_of

pytestmark = pytest.mark.skipif(BACKEND != "vm", reason="the workspace sync needs the VM backend")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kernel, Path]]:
    host = tmp_path_factory.mktemp("notebook-dir")
    data = tmp_path_factory.mktemp("jupyter-data")
    env = dict(os.environ, JUPYTER_DATA_DIR=str(data), JPY_SESSION_NAME="ws.ipynb")
    k = Kernel(extra_arguments=["--MicroVMKernel.workspace=sync"], env=env, cwd=str(host))
    yield k, host
    k.shutdown()


def _ok(k: Kernel, code: str) -> tuple[str, str]:
    reply, outputs = k.execute(code, timeout=120)
    assert reply["status"] == "ok", (code, reply, stderr_of(outputs))
    result = "".join(m["content"]["data"]["text/plain"] for m in outputs
                     if m["msg_type"] == "execute_result")
    return stdout_of(outputs) + result, stderr_of(outputs)


def test_restore_brings_back_the_guest_files_and_loses_nothing_on_the_host(
        setup: tuple[Kernel, Path]) -> None:
    k, host = setup
    _ok(k, "open('out.txt', 'w').write('v1')")
    assert (host / "out.txt").read_text() == "v1"
    _ok(k, "%snapshot before")
    _ok(k, "open('out.txt', 'w').write('v2 longer'); open('later.txt', 'w').write('later')")
    (host / "host-new.txt").write_text("from the host")
    said, _ = _ok(k, "%restore before")
    assert "Workspace:" in said and "guest copy" in said, said
    # The host keeps its newer version; the snapshot's is saved beside it.
    assert (host / "out.txt").read_text() == "v2 longer"
    copies = [n for n in os.listdir(host) if n.startswith("out (guest copy ")]
    assert len(copies) == 1 and (host / copies[0]).read_text() == "v1", os.listdir(host)
    assert (host / "later.txt").read_text() == "later"
    # ... and the restored guest sees the host's files.
    out, _ = _ok(k, "open('out.txt').read(), open('later.txt').read(), open('host-new.txt').read()")
    assert out == repr(("v2 longer", "later", "from the host"))


def test_a_restart_starts_from_the_notebook_directory(setup: tuple[Kernel, Path]) -> None:
    k, host = setup
    _ok(k, "open('made-before-restart.txt', 'w').write('kept')")
    k.km.restart_kernel(now=False)
    k.kc.wait_for_ready(timeout=300)
    k.flush()
    out, _ = _ok(k, "import os; open('made-before-restart.txt').read(), os.getcwd()")
    assert out == repr(("kept", "/workspace"))
    assert (host / "made-before-restart.txt").read_text() == "kept"


def test_a_resume_after_idle_suspend_keeps_the_sync_state(tmp_path: Path) -> None:
    """The REPL resumed after an idle suspend is the one the state describes: a file changed
    on the host meanwhile is simply copied in, no 'guest copy' appears."""
    from .test_idle_suspend import IDLE, SUSPEND_TIMEOUT, qemu_pids

    data = tmp_path / "data"
    host = tmp_path / "notebook"
    host.mkdir()
    (host / "table.csv").write_text("v1")
    env = dict(os.environ, JUPYTER_DATA_DIR=str(data))
    k = Kernel(extra_arguments=["--MicroVMKernel.workspace=sync",
                                f"--MicroVMKernel.idle_suspend_after={IDLE}"],
               env=env, cwd=str(host))
    try:
        pid = k.km.provisioner.process.pid  # type: ignore[union-attr]
        out, _ = _ok(k, "open('table.csv').read()")
        assert out == repr("v1")
        import time

        deadline = time.monotonic() + SUSPEND_TIMEOUT
        while qemu_pids(pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not qemu_pids(pid), "the kernel did not suspend"
        (host / "table.csv").write_text("v2 from the host")
        out, err = _ok(k, "open('table.csv').read()")
        assert out == repr("v2 from the host"), err
        assert sorted(os.listdir(host)) == ["table.csv"], (os.listdir(host), err)
    finally:
        k.shutdown()
