"""Prepared (supermachine_kernel/prepared.py): made on a thread, claimed once, and whatever is
not claimed is disposed of, whether it was given up before or after it was ready."""
from __future__ import annotations

import threading
import time

from supermachine_kernel.prepared import Prepared


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_claimed_once_and_never_disposed():
    disposed = []
    p = Prepared(lambda: "vm", disposed.append, name="t-claim")
    assert p.claim(5) == "vm"
    assert p.claim(5) is None
    p.release()  # no-op once claimed
    assert disposed == [] and p.error is None and p.done


def test_released_before_ready_is_disposed_when_ready():
    gate = threading.Event()
    disposed = []

    def make():
        gate.wait(5)
        return "vm"

    p = Prepared(make, disposed.append, name="t-early-release")
    p.release()
    assert disposed == [] and not p.done
    gate.set()
    assert _wait_for(lambda: disposed == ["vm"])
    assert p.claim(1) is None


def test_released_after_ready_is_disposed_at_once():
    disposed = []
    p = Prepared(lambda: "vm", disposed.append, name="t-late-release")
    assert _wait_for(lambda: p.done)
    p.release()
    assert disposed == ["vm"]
    p.release()
    assert disposed == ["vm"]  # once


def test_a_claim_that_times_out_gives_it_up():
    gate = threading.Event()
    disposed = []

    def make():
        gate.wait(5)
        return "vm"

    p = Prepared(make, disposed.append, name="t-timeout")
    assert p.claim(0.01) is None
    gate.set()
    assert _wait_for(lambda: disposed == ["vm"])


def test_a_failure_is_kept_and_claims_nothing():
    disposed = []

    def make():
        raise RuntimeError("no QEMU")

    p = Prepared(make, disposed.append, name="t-fail")
    assert p.claim(5) is None and isinstance(p.error, RuntimeError)
    p.release()
    assert disposed == []
