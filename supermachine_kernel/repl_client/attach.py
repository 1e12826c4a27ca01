"""Attach to the guest REPL a restored VM already runs, and greet it.

A warm snapshot (the image's, baked with the REPL running; or one taken by %snapshot) holds the
REPL as a running process. Every path that restores one adopts that REPL here: the kernel
process's early restore (startup/sequence.py), the VM backend's pooled VMs (vm.py), and
%restore with its restore-ahead (machine/current.py). This module also owns where the REPL
lives in the guest (driver path, argv, the id file the warmup leaves).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from .backend import read_ready_frame
from .frames import encode_frame

GUEST_DRIVER_PATH = "/tmp/supermachine-repl.py"
REPL_ID_FILE = "/tmp/.supermachine-repl.json"
REPL_ARGV = ["python3", "-u", GUEST_DRIVER_PATH]


class NoReplError(LookupError):
    """The restored VM runs no REPL that can be told apart (a snapshot taken without one)."""


def running_repl_ids(vm: Any) -> list[int]:
    """Ids of the guest processes that are a running REPL, from the agent's process table
    (one round trip; works on the runtime's VM object and on `api.Vm`)."""
    return [int(p["id"]) for p in vm.processes()
            if p.get("running") and list(p.get("argv") or []) == REPL_ARGV]


def find_repl(vm: Any) -> int:
    """The id of the REPL process in a restored VM: the one running REPL of the agent's process
    table (~5 ms under TCG right after a restore); only when the table holds several, the id
    file the warmup left (reading a guest file then takes ~40 ms, on a kernel start's path)."""
    repls = running_repl_ids(vm)
    if len(repls) == 1:
        return repls[0]
    if not repls:
        raise NoReplError("the VM runs no guest REPL")
    try:
        return int(json.loads(vm.read_file(REPL_ID_FILE))["id"])
    except Exception as e:  # noqa: BLE001 - missing or unreadable id file: still ambiguous
        raise NoReplError(f"the VM runs {len(repls)} guest REPLs and no id file says which "
                          f"one is the kernel's ({e})") from e


def attach_repl(vm: Any, repl_id: Optional[int] = None, *, greet: bool = False,
                ready_timeout: Optional[float] = None) -> Any:
    """Attaches to the REPL in the restored `vm` (process `repl_id` when the caller recorded
    it, else `find_repl`) and returns its process handle. Blocking.

    `greet` says hello to it, "idle" (nobody waits for a cell yet, so the after-restore
    warm-up the agent's Hello notification started goes on). Its "ready" answer is then left
    unread for `GuestRepl` (mark the handle `greeted`), or, with `ready_timeout`, read here
    (the REPL's after-restore path has then run once, e.g. before a restore-ahead VM is
    paused; the handle is `prestarted` and `GuestRepl` greets it again).

    Raises NoReplError, or what `vm.attach_process` raises for an id that is not running. The
    caller releases the VM on failure."""
    if repl_id is None:
        repl_id = find_repl(vm)
    child = vm.attach_process(int(repl_id))
    if greet:
        child.write_stdin(encode_frame({"type": "hello", "idle": True}))
        if ready_timeout is not None:
            read_ready_frame(child, timeout=ready_timeout)
    return child
