"""attach_repl finds the warm REPL in a restored VM from the agent's process table (reading the
id file the warmup left only when the table does not say which process it is), greets it as
asked, and VmBackend falls back to spawning a REPL when there is none."""
from __future__ import annotations

import json

import pytest

from supermachine_kernel.repl_client.attach import REPL_ARGV, REPL_ID_FILE, NoReplError, attach_repl
from supermachine_kernel.repl_client.frames import FrameDecoder, encode_frame
from supermachine_kernel.repl_client.vm import VmBackend


class FakeChild:
    def __init__(self, pid, stdout=b""):
        self.id = pid
        self.stdin = b""
        self.stdout = stdout

    def write_stdin(self, data):
        self.stdin += data

    def read_stdout(self, n, timeout=None):
        chunk, self.stdout = self.stdout[:n], self.stdout[n:]
        return chunk


class FakeVm:
    def __init__(self, processes, id_file=None, stdout=b""):
        self._processes = processes
        self._id_file = id_file
        self._stdout = stdout
        self.reads = []
        self.attached = []

    def processes(self):
        return self._processes

    def read_file(self, path):
        self.reads.append(path)
        if self._id_file is None:
            raise FileNotFoundError(path)
        return json.dumps({"id": self._id_file}).encode()

    def attach_process(self, pid):
        if not any(p["id"] == pid and p["running"] for p in self._processes):
            raise RuntimeError(f"no process {pid}")
        self.attached.append(pid)
        return FakeChild(pid, self._stdout)


def proc(pid, argv=REPL_ARGV, running=True):
    return {"id": pid, "os_pid": 100 + pid, "argv": list(argv), "running": running, "tty": False}


def test_the_one_running_repl_is_attached_without_reading_files():
    vm = FakeVm([proc(1), proc(2, argv=["sleep", "9"]), proc(3, running=False)])
    child = attach_repl(vm)
    assert child.id == 1 and child.stdin == b""  # not greeted unless asked
    assert vm.reads == []


def test_ambiguous_table_falls_back_to_the_id_file():
    vm = FakeVm([proc(1), proc(4)], id_file=4)
    assert attach_repl(vm).id == 4
    assert vm.reads == [REPL_ID_FILE]
    with pytest.raises(NoReplError, match="2 guest REPLs"):
        attach_repl(FakeVm([proc(1), proc(4)]))


def test_a_recorded_id_is_used_as_is():
    vm = FakeVm([proc(1), proc(2), proc(5, argv=["python3", "other.py"])])
    assert attach_repl(vm, 5).id == 5 and vm.reads == []
    with pytest.raises(RuntimeError, match="no process 9"):
        attach_repl(vm, 9)


def test_no_repl_at_all_is_an_error_and_the_backend_spawns_one():
    vm = FakeVm([proc(2, argv=["sleep", "9"])])
    with pytest.raises(NoReplError):
        attach_repl(vm)
    assert VmBackend._attach_warm_repl(vm) is None
    assert vm.attached == [] and vm.reads == []
    assert VmBackend._attach_warm_repl(FakeVm([proc(3)])).id == 3


def test_greeting_sends_an_idle_hello_and_reads_the_ready_only_when_asked():
    ready = encode_frame({"type": "ready", "python_version": "3.11"})
    hello = FrameDecoder().feed(encode_frame({"type": "hello", "idle": True}))
    vm = FakeVm([proc(1)], stdout=ready)
    left = attach_repl(vm, greet=True)
    assert FrameDecoder().feed(left.stdin) == hello and left.stdout == ready  # for the session
    read = attach_repl(vm, greet=True, ready_timeout=5)
    assert FrameDecoder().feed(read.stdin) == hello and read.stdout == b""
