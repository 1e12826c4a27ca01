"""VmBackend finds the warm REPL in a restored VM from the agent's process table, reading the id
file the warmup left only when the table does not say which process it is."""
from __future__ import annotations

import json

from supermachine_kernel.repl_client.vm import REPL_ARGV, REPL_ID_FILE, VmBackend


class FakeVm:
    def __init__(self, processes, id_file=None):
        self._processes = processes
        self._id_file = id_file
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
        self.attached.append(pid)
        return f"child-{pid}"


def proc(pid, argv=REPL_ARGV, running=True):
    return {"id": pid, "os_pid": 100 + pid, "argv": list(argv), "running": running, "tty": False}


def test_the_one_running_repl_is_attached_without_reading_files():
    vm = FakeVm([proc(1), proc(2, argv=["sleep", "9"]), proc(3, running=False)])
    assert VmBackend()._attach_restored(vm) == "child-1"
    assert vm.reads == []


def test_ambiguous_table_falls_back_to_the_id_file():
    vm = FakeVm([proc(1), proc(4)], id_file=4)
    assert VmBackend()._attach_restored(vm) == "child-4"
    assert vm.reads == [REPL_ID_FILE]


def test_no_repl_at_all_means_spawning_one():
    vm = FakeVm([proc(2, argv=["sleep", "9"])])
    assert VmBackend()._attach_restored(vm) is None
    assert vm.attached == []
