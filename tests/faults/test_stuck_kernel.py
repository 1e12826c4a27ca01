"""A stuck guest ends in bounded time, with a cell error that says what was done (issue 16 item 1).

Each test drives a real kernel through jupyter_client and checks that the next cell is answered
correctly afterwards:
- a fork bomb, interrupted: the Python process (and everything it forked) is killed after the
  grace, and a fresh REPL starts in the same VM (files kept);
- a C loop that never checks signals (`sum(range(10**13))`): same escalation;
- a REPL frame header announcing 31 MB that never come: the read deadline breaks the channel;
- the agent (PID 1) frozen by ptrace from guest root: the liveness ping fails, the VM is replaced.
The kernels run with a short grace, read deadline and ping timeout (traits of MicroVMKernel).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, SLOW, Kernel, LocalKernelspecs

from supermachine_kernel.cli.install import prepare

KERNEL = "smk-faults-stuck"
KERNEL_ROOT = "smk-faults-stuck-root"  # guest root can freeze the agent; the default user cannot
GRACE = 2.0
# The kernel's own settings (not the guest's, which `prepare` reads from the kernelspec).
STUCK_ARGS = [f"--MicroVMKernel.interrupt_grace={GRACE}", "--MicroVMKernel.frame_timeout=5",
              "--MicroVMKernel.agent_ping_interval=2", "--MicroVMKernel.agent_ping_timeout=10"]
_SPECS = LocalKernelspecs("stuck-guest", {KERNEL: [], KERNEL_ROOT: ["--MicroVMKernel.guest_user=root"]})
_prepared: set[str] = set()

pytestmark = [pytest.mark.vm] if BACKEND == "vm" else []


def _start(name: str) -> Kernel:
    """A kernel of `name`; on VMs its warm snapshot is baked first, outside the cell timeouts
    (a first bake takes minutes under TCG)."""
    _SPECS.use()
    if BACKEND == "vm" and name not in _prepared:
        prepare(name, timeout=1800)
        _prepared.add(name)
    return Kernel(name, extra_arguments=STUCK_ARGS)


@pytest.fixture
def kernel():
    k = _start(KERNEL)
    yield k
    k.shutdown()


@pytest.fixture
def root_kernel():
    k = _start(KERNEL_ROOT)
    yield k
    k.shutdown()


def _interrupt_when(k: Kernel, started: threading.Event, times: int = 1,
                    delay: float = 0.5) -> None:
    def go() -> None:
        started.wait(60 * SLOW)
        time.sleep(delay)
        for _ in range(times):
            k.km.interrupt_kernel()
            time.sleep(0.2)

    threading.Thread(target=go, daemon=True).start()


def _started(event: threading.Event):
    return lambda m: m["msg_type"] == "stream" and "started" in m["content"].get("text", "") \
        and event.set()


def _leave_a_file(k: Kernel) -> None:
    reply, _ = k.execute("open('/tmp/kept.txt', 'w').write('kept'); x = 41", timeout=60)
    assert reply["status"] == "ok", reply


def _assert_python_restarted_in_same_vm(k: Kernel, reply: dict) -> None:
    assert reply["status"] == "error", reply
    assert reply["ename"] == "GuestStuck", reply
    assert "the Python process was killed" in reply["evalue"], reply
    assert "variables are lost" in reply["evalue"], reply
    # variables gone, files kept, and the kernel answers
    reply, _ = k.execute("x", timeout=120)
    assert reply["status"] == "error" and reply["ename"] == "NameError", reply
    assert k.value("open('/tmp/kept.txt').read()", timeout=120) == "'kept'"
    assert k.value("6*7") == "42"


@pytest.mark.skipif(BACKEND != "vm", reason="a fork bomb on the host is not contained")
def test_fork_bomb_is_killed_after_the_grace(kernel):
    k = kernel
    _leave_a_file(k)
    started = threading.Event()
    _interrupt_when(k, started)
    reply, outputs = k.execute(
        "import os\nprint('started', flush=True)\nwhile True:\n    try:\n        os.fork()\n"
        "    except OSError:\n        pass\n", timeout=300, on_iopub=_started(started))
    _assert_python_restarted_in_same_vm(k, reply)
    # no process of the bomb is left: the guest runs only a handful of processes
    count = k.value("import os; len([p for p in os.listdir('/proc') if p.isdigit()])")
    assert int(count) < 60, count


def test_signal_deaf_c_loop_is_killed_after_the_grace(kernel):
    k = kernel
    _leave_a_file(k)
    started = threading.Event()
    _interrupt_when(k, started)
    # on VMs, a process that left the REPL's process group and session goes too (on the host,
    # the local backend, the user's other processes stay)
    escape = ("import subprocess\nsubprocess.Popen(['sleep', '987'], start_new_session=True)\n"
              if BACKEND == "vm" else "")
    reply, outputs = k.execute(escape + "print('started', flush=True)\nsum(range(10**13))",
                               timeout=300, on_iopub=_started(started))
    _assert_python_restarted_in_same_vm(k, reply)
    assert f"ignored for {GRACE:g} s" in reply["evalue"], reply
    if escape:
        left = k.value("import glob; [p for p in glob.glob('/proc/[0-9]*/cmdline') "
                       "if open(p, 'rb').read() == b'sleep\\x00987\\x00']")
        assert left == "[]", left


def test_second_interrupt_kills_at_once(kernel):
    k = kernel
    _leave_a_file(k)
    started = threading.Event()
    _interrupt_when(k, started, times=2)
    reply, outputs = k.execute(
        "print('started', flush=True)\nwhile True:\n    try:\n        sum(range(10**13))\n"
        "    except KeyboardInterrupt:\n        pass\n", timeout=300, on_iopub=_started(started))
    _assert_python_restarted_in_same_vm(k, reply)
    assert "second interrupt" in reply["evalue"], reply


def test_half_sent_frame_breaks_the_channel(kernel):
    """The REPL's protocol fd gets a header announcing 31 MB and then nothing."""
    k = kernel
    _leave_a_file(k)
    code = ("import gc, os, struct, time\n"
            "ch = next(o for o in gc.get_objects() if type(o).__name__ == 'Channel' "
            "and hasattr(o, '_wfd'))\n"
            "os.write(ch._wfd, struct.pack('>I', 31 * 1024 * 1024) + b'{')\n"
            "time.sleep(3600)\n")
    reply, outputs = k.execute(code, timeout=300)
    _assert_python_restarted_in_same_vm(k, reply)
    assert "did not finish" in reply["evalue"], reply


@pytest.mark.skipif(BACKEND != "vm", reason="the agent runs in a VM")
def test_agent_frozen_by_ptrace_is_replaced(root_kernel):
    k = root_kernel
    code = ("import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, "
            "ctypes.c_void_p]\n"
            "assert libc.ptrace(0x4206, 1, None, None) == 0, ctypes.get_errno()  # SEIZE\n"
            "assert libc.ptrace(0x4207, 1, None, None) == 0, ctypes.get_errno()  # INTERRUPT\n"
            "time.sleep(3600)\n")
    reply, outputs = k.execute(code, timeout=300)
    assert reply["status"] == "error", reply
    assert reply["ename"] == "GuestStuck", reply
    assert "replaced" in reply["evalue"] and "files" in reply["evalue"], reply
    assert k.value("6*7", timeout=120) == "42"
