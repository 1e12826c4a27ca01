"""What bench/soak.py (issue 16 item 7: many kernels, mixed cells, every message and leftover
checked) found, each through a real kernel:

- A kernel shut down after %snapshot / %restore left a VM work dir behind: that of the VM
  restored ahead for the next %restore (machine/restore_ahead.py), released on a daemon thread
  that the process's exit (os._exit) cut off, or still being restored. QEMU died with the
  kernel, but its work dir (sockets) stayed in the runtime dir until another kernel's start
  swept it; a SIGTERM (no exit functions) left it too. Now the exit removes the work dirs of
  every VM the process still has, without waiting for any (kernel/lifecycle.py). The kernel
  runs with a private XDG_RUNTIME_DIR, so whatever is left is its own.
- A guest's death put the kernel's log line ("guest died: ...") on IOPub with no parent header
  (a module logger without a handler fell back to Python's last-resort handler, which writes to
  sys.stderr, ipykernel's IOPub stream): in no cell's output, and missing from the kernel log.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, SLOW, Kernel, LocalKernelspecs  # noqa: E402

KERNEL = "smk-faults-leftovers"
_SPECS = LocalKernelspecs("faults-leftovers", {KERNEL: []})

pytestmark = [pytest.mark.vm, pytest.mark.skipif(BACKEND != "vm", reason="VM work dirs need VMs")]


def _work_dirs(runtime: Path) -> list[str]:
    return sorted(p.name for p in (runtime / "supermachine").glob("vm-*"))


@pytest.fixture
def short_dir():
    """A private directory with a short path (a unix socket's path must fit in 108 bytes)."""
    d = tempfile.mkdtemp(prefix="smk-lo-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("end", ["shutdown_request", "SIGTERM"])
def test_kernel_end_after_restore_leaves_no_work_dir(short_dir, end) -> None:
    _SPECS.use()
    runtime, data = short_dir / "rt", short_dir / "data"
    runtime.mkdir(mode=0o700)
    k = Kernel(KERNEL, env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime),
                                JUPYTER_DATA_DIR=str(data)))
    pid = k.km.provisioner.pid
    # jupyter_client's own patience (shutdown_wait_time 5 s: SIGTERM at half of it, SIGKILL at
    # the end), as in Jupyter Server: the kernel's exit must not wait for the standby VM that
    # %restore started restoring, or a loaded host SIGKILLs it and its work dir stays (seen in
    # two clean-clone runs while the exit waited up to 10 s for that restore).
    assert k.km.shutdown_wait_time == 5.0
    try:
        assert k.value("x = 5; x") == "5"
        reply, _ = k.execute("%snapshot s1", timeout=120)
        assert reply["status"] == "ok", reply
        reply, _ = k.execute("x = 6")
        assert reply["status"] == "ok", reply
        reply, _ = k.execute("%restore s1", timeout=120)
        assert reply["status"] == "ok", reply
        assert k.value("x") == "5"
        # %restore restores the same snapshot ahead again: the kernel's VM and that standby
        deadline = time.monotonic() + 60 * SLOW
        while len(_work_dirs(runtime)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_work_dirs(runtime)) >= 2, _work_dirs(runtime)
        if end == "SIGTERM":  # what jupyter_client sends a kernel that outlived its shutdown
            os.kill(pid, signal.SIGTERM)
            psutil.wait_procs([psutil.Process(pid)], timeout=60)
    finally:
        k.shutdown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _work_dirs(runtime) == [], "VM work dirs left after the kernel exited"


def test_guest_death_log_line_stays_off_iopub() -> None:
    _SPECS.use()
    k = Kernel(KERNEL)
    seen: list[dict] = []
    try:
        reply, outputs = k.execute("%vm")
        assert reply["status"] == "ok", reply
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        qemu = int(re.search(r"QEMU pid (\d+)", text).group(1))
        k.flush()
        msg_id = k.kc.execute("print('sleeping', flush=True)\nimport time\ntime.sleep(600)")
        killed, idle, deadline = False, False, time.monotonic() + 120 * SLOW
        while not idle and time.monotonic() < deadline:
            try:
                msg = k.kc.iopub_channel.get_msg(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(msg)
            mine = msg["parent_header"].get("msg_id") == msg_id
            if mine and msg["msg_type"] == "stream" and not killed:
                os.kill(qemu, signal.SIGKILL)
                killed = True
            idle = mine and msg["msg_type"] == "status" and \
                msg["content"]["execution_state"] == "idle"
        assert killed and idle, [m["msg_type"] for m in seen]
        errors = [m for m in seen if m["msg_type"] == "error"]
        assert errors and errors[0]["content"]["ename"] == "GuestDied", errors
        while True:  # whatever else comes in the next seconds
            try:
                seen.append(k.kc.iopub_channel.get_msg(timeout=2.0))
            except queue.Empty:
                break
        assert k.value("6 * 7", timeout=120) == "42"
    finally:
        k.shutdown()
    orphans = [m for m in seen if not m["parent_header"].get("msg_id")]
    assert not [m for m in orphans if "guest died" in str(m["content"])], orphans
