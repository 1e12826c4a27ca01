"""The workspace sync through real kernels (jupyter_client): the kernel's working directory is
the guest REPL's cwd, files travel both ways around each cell, read-only and off do what they
say, a file past a cap is reported once (kernel/workspace_hook.py, supermachine_kernel/workspace/).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import BACKEND, Kernel, stderr_of

pytestmark = pytest.mark.skipif(BACKEND != "vm", reason="the workspace sync needs the VM backend")

CAP = 100_000


def _kernel(cwd: Path, mode: str, *extra: str) -> Kernel:
    return Kernel(extra_arguments=[f"--MicroVMKernel.workspace={mode}", *extra], cwd=str(cwd))


def _run(k: Kernel, code: str, timeout: float = 60) -> tuple[str, str]:
    """(text/plain of the result or '', stderr) of a cell that must succeed."""
    reply, outputs = k.execute(code, timeout=timeout)
    assert reply["status"] == "ok", (reply, outputs)
    result = "".join(m["content"]["data"]["text/plain"] for m in outputs
                     if m["msg_type"] == "execute_result")
    return result, stderr_of(outputs)


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("notebook-dir")
    (d / "data.csv").write_text("a,b\n1,2\n")
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("in a subdirectory\n")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return d


@pytest.fixture(scope="module")
def synced(host_dir: Path) -> Iterator[Kernel]:
    k = _kernel(host_dir, "sync", f"--MicroVMKernel.workspace_max_file_bytes={CAP}")
    yield k
    k.shutdown()


def test_the_notebook_directory_is_the_cells_cwd(synced: Kernel) -> None:
    out, err = _run(synced, "import os; (os.getcwd(), open('data.csv').read(), "
                            "open('sub/notes.txt').read(), os.path.exists('.git'))")
    assert out == repr(("/workspace", "a,b\n1,2\n", "in a subdirectory\n", False)), err
    assert err == ""


def test_a_file_a_cell_writes_is_on_the_host_after_the_cell(synced: Kernel,
                                                            host_dir: Path) -> None:
    _, err = _run(synced, "import os\nos.makedirs('results', exist_ok=True)\n"
                          "open('results/out.txt', 'w').write('from the guest\\n')")
    assert (host_dir / "results" / "out.txt").exists(), err
    assert (host_dir / "results" / "out.txt").read_text() == "from the guest\n"


def test_a_host_edit_between_cells_is_seen_by_the_next_cell(synced: Kernel,
                                                            host_dir: Path) -> None:
    (host_dir / "data.csv").write_text("a,b\n1,2\n3,4\n")
    (host_dir / "new.txt").write_text("new on the host")
    out, _ = _run(synced, "open('data.csv').read(), open('new.txt').read()")
    assert out == repr(("a,b\n1,2\n3,4\n", "new on the host"))


def test_deletes_travel_both_ways(synced: Kernel, host_dir: Path) -> None:
    (host_dir / "gone-on-host.txt").write_text("x")
    (host_dir / "gone-in-guest.txt").write_text("y")
    _run(synced, "1")
    (host_dir / "gone-on-host.txt").unlink()
    out, _ = _run(synced, "import os; os.remove('gone-in-guest.txt'); "
                          "os.path.exists('gone-on-host.txt')")
    assert out == "False"
    assert not (host_dir / "gone-in-guest.txt").exists()


def test_a_file_past_the_cap_is_reported_once(synced: Kernel, host_dir: Path) -> None:
    (host_dir / "big.bin").write_bytes(b"\0" * (CAP + 1))
    out, err = _run(synced, "import os; os.path.exists('big.bin')")
    assert out == "False"
    assert "big.bin" in err and "workspace_max_file_bytes" in err, err
    out, err = _run(synced, "2")
    assert "big.bin" not in err


def test_what_a_silent_execute_synced_is_said_by_the_next_cell(synced: Kernel,
                                                               host_dir: Path) -> None:
    (host_dir / "big2.bin").write_bytes(b"\0" * (CAP + 1))
    reply, outputs = synced.execute("1", silent=True)
    assert reply["status"] == "ok" and stderr_of(outputs) == ""
    _, err = _run(synced, "2")
    assert "big2.bin" in err, err


def test_a_file_the_cell_is_still_writing_ends_up_whole(synced: Kernel, host_dir: Path) -> None:
    """A background thread of the cell keeps writing after the cell: its file comes back after
    a later cell (the guest's inotify flag stays set until a listing was taken)."""
    _run(synced, "import threading, time\n"
                 "def w():\n    time.sleep(1)\n    open('late.txt', 'w').write('late')\n"
                 "threading.Thread(target=w).start()")
    time.sleep(3 * (8 if BACKEND == "vm" else 1))
    _run(synced, "3")
    assert (host_dir / "late.txt").read_text() == "late"


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kernel, Path]]:
    d = tmp_path_factory.mktemp("read-only-dir")
    (d / "input.txt").write_text("read me")
    k = _kernel(d, "read-only")
    yield k, d
    k.shutdown()


def test_read_only_brings_files_in_and_never_writes_the_host(
        read_only: tuple[Kernel, Path]) -> None:
    k, d = read_only
    out, _ = _run(k, "open('input.txt').read()")
    assert out == repr("read me")
    _run(k, "open('output.txt', 'w').write('x'); open('input.txt', 'w').write('changed')")
    _run(k, "4")
    assert sorted(os.listdir(d)) == ["input.txt"]
    assert (d / "input.txt").read_text() == "read me"


def test_off_leaves_the_guest_cwd_alone(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x")
    k = _kernel(tmp_path, "off")
    try:
        # /workspace exists (the guest user's, made with the image's warm snapshot), untouched
        out, _ = _run(k, "import os; (os.getcwd() != '/workspace', os.listdir('/workspace'))")
        assert out == repr((True, []))
        _run(k, "open('written.txt', 'w').write('x')")
        assert sorted(os.listdir(tmp_path)) == ["data.csv"]
    finally:
        k.shutdown()
