"""A process that ends while it still has VMs (a restore in flight on another thread, a
release that never came) leaves none of their work dirs behind: the API module's exit function
(`api.remove_work_dirs_at_exit`, core/runtime/src/workdir.rs) removes them, and the QEMUs die
with the process (parent-death signal). Before, each stayed in the runtime dir until another
process's start swept it; a kernel that Jupyter SIGKILLs while it waits for a standby VM left
one (tests/faults/test_soak_findings.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.vm

SCRIPT = textwrap.dedent("""
    import atexit, os, sys, threading, time
    # Last of the exit functions, as in the kernel (kernel/lifecycle.py): on Python < 3.14 a
    # daemon thread still inside a runtime call when the interpreter finalizes is unwound by
    # pthread_exit, which aborts the process ("FATAL: exception not rethrown", CPython
    # gh-87135); the kernel never finalizes, for that reason.
    atexit.register(os._exit, 0)
    from supermachine_kernel import api
    image = api.Image.build(progress=False)
    held = image.boot()  # never released
    print(held.workdir, held.qemu_pid, flush=True)
    def restore_forever():  # a VM whose restore is still going when the process ends
        vm = image.boot()
        print(vm.workdir, vm.qemu_pid, flush=True)
        time.sleep(3600)
    threading.Thread(target=restore_forever, daemon=True).start()
    base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "supermachine")
    while len([d for d in os.listdir(base) if d.startswith("vm-")]) < 2:
        time.sleep(0.05)
    if sys.argv[1] == "exit":
        sys.exit(0)
    if sys.argv[1] == "fork":
        child = os.fork()
        if child == 0:
            sys.exit(0)  # the child's exit functions run: they must leave the parent's VMs be
        os.waitpid(child, 0)
        print("after the fork:", os.path.isdir(held.workdir),
              held.exec(["echo", "alive"]).stdout.decode().strip(), flush=True)
        sys.exit(0)
    api.remove_work_dirs_at_exit()
    try:
        image.boot()
    except OSError as e:
        print("refused:", e, flush=True)
""")


@pytest.fixture
def runtime_dir():
    d = Path(tempfile.mkdtemp(prefix="smk-ex-"))  # short: unix socket paths fit in 108 bytes
    (d / "rt").mkdir(mode=0o700)
    yield d / "rt"
    shutil.rmtree(d, ignore_errors=True)


def _run(runtime_dir: Path, how: str) -> str:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    p = subprocess.run([sys.executable, "-c", SCRIPT, how], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _work_dirs(runtime_dir: Path) -> list[str]:
    return sorted(p.name for p in (runtime_dir / "supermachine").glob("vm-*"))


def _qemus_of(runtime_dir: Path) -> list[int]:
    """QEMU processes whose command line names a socket in `runtime_dir`."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "qemu-system" in cmd and str(runtime_dir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p.pid)
    return found


def test_exit_with_vms_in_flight_leaves_no_work_dir(image, runtime_dir) -> None:
    out = _run(runtime_dir, "exit")
    dirs = [line.split()[0] for line in out.splitlines()]
    assert dirs and all(Path(d).parent == runtime_dir / "supermachine" for d in dirs), out
    assert _work_dirs(runtime_dir) == [], "work dirs left after exit"
    deadline = time.monotonic() + 30
    while _qemus_of(runtime_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _qemus_of(runtime_dir) == [], "a QEMU outlived its process"


def test_a_forked_childs_exit_leaves_the_parents_vms_be(image, runtime_dir) -> None:
    out = _run(runtime_dir, "fork")
    assert "after the fork: True alive" in out, out
    assert _work_dirs(runtime_dir) == []  # and the parent's own exit removed them


def test_no_vm_starts_once_the_process_ends(image, runtime_dir) -> None:
    out = _run(runtime_dir, "remove")
    assert "refused: create a VM work dir in" in out and \
        "this process is ending: it starts no new VM" in out, out
    assert _work_dirs(runtime_dir) == []
