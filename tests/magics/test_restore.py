"""%restore: the whole session state comes back (variables, guest files, a background thread's
progress, a background process), the kernel carries on; unknown names and damaged snapshots are
clear errors; snapshots survive a kernel restart (both kinds, with or without Jupyter Server's
notebook name) and are restorable by NAME from a new kernel of the same notebook, and from any
other kernel as GROUP/NAME."""
from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

import nbformat
from supermachine_kernel.cli.notebook_runner import NotebookRunner

from .conftest import KERNEL, MagicKernel, needs_vm, use_kernelspec

SETUP = """
import os, random, subprocess, threading, time
counter = {"n": 0}
def _tick():
    while True:
        counter["n"] += 1
        time.sleep(0.05)
threading.Thread(target=_tick, daemon=True).start()
sleeper = subprocess.Popen(["sleep", "100000"])
data = {"rows": list(range(1000)), "label": "original"}
with open("/home/jovyan/results.csv", "w") as f:
    f.write("a,b\\n1,2\\n")
time.sleep(0.5)
"""


def test_state_is_back_after_restore(kernel):
    kernel.ok(SETUP)
    kernel.ok("%snapshot base")
    progress_at_snapshot = int(kernel.ok("print(counter['n'])"))
    # Destroy things: variables, the file, the process; let the thread run on.
    kernel.ok("del data\nwith open('/home/jovyan/results.csv', 'w') as f: f.write('overwritten')\n"
              "sleeper.kill(); sleeper.wait(); time.sleep(1.5)")
    progress_before_restore = int(kernel.ok("print(counter['n'])"))
    assert progress_before_restore > progress_at_snapshot
    count_before = kernel.execute("1")[0]["execution_count"]

    out = kernel.ok("%restore base")
    assert "Restored snapshot 'base'" in out

    assert kernel.value("data['label'], len(data['rows'])") == "('original', 1000)"
    assert kernel.value("open('/home/jovyan/results.csv').read()") == repr("a,b\n1,2\n")
    assert kernel.value("sleeper.poll() is None and os.path.exists(f'/proc/{sleeper.pid}')") == "True"
    # The thread is back where it was at the snapshot, and running again.
    n1 = int(kernel.ok("print(counter['n'])"))
    assert n1 < progress_before_restore
    n2 = int(kernel.ok("time.sleep(0.5); print(counter['n'])"))
    assert n2 > n1
    # The kernel's execution count kept counting.
    reply, _ = kernel.execute("1")
    assert reply["execution_count"] > count_before


def test_clock_and_random_after_restore(kernel):
    kernel.ok("%snapshot clock")
    time.sleep(3)
    kernel.ok("%restore clock")
    skew = float(kernel.value(f"time.time() - {time.time()}"))
    assert abs(skew) < 2.0 + 1.0, skew  # the guest clock was set to the host's at restore
    draw = "random.random(), __import__('numpy').random.rand(), os.urandom(8).hex()"
    first = ast.literal_eval(kernel.value(draw))
    kernel.ok("%restore clock")
    second = ast.literal_eval(kernel.value(draw))
    # Two restores of one snapshot never share random numbers: Python's, numpy's or the OS's.
    assert all(a != b for a, b in zip(first, second)), (first, second)


def test_default_is_latest_and_unknown_lists_available(kernel):
    kernel.ok("marker = 'latest'")
    reply, _ = kernel.execute("%snapshot newest")
    kernel.ok("marker = 'changed'")
    out = kernel.ok("%restore")
    assert "Restored snapshot 'newest'" in out
    # The state is the one the %snapshot cell ran in: "at" that cell, not "after" it.
    assert f"at cell [{reply['execution_count']}]" in out, out
    assert kernel.value("marker") == "'latest'"
    reply, (err,) = kernel.error("%restore no-such-snapshot")
    assert err["ename"] == "SnapshotNotFound"
    assert "no snapshot named 'no-such-snapshot'" in err["evalue"]
    assert "%snapshots --all" in err["evalue"]
    for name in ("base", "clock", "newest"):
        assert name in err["evalue"]


def test_corrupted_snapshot_is_refused_clearly(kernel):
    kernel.ok("%snapshot damaged")
    state = Path(kernel.store().path("damaged")) / "state"
    with open(state, "r+b") as f:
        f.seek(state.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(state.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    reply, (err,) = kernel.error("%restore damaged")
    assert "cannot restore 'damaged'" in err["evalue"]
    assert "corrupt" in err["evalue"]  # the runtime's checksum message, surfaced as is
    assert "%snapshot --delete damaged" in "\n".join(err["traceback"])
    assert kernel.value("6 * 7") == "42"  # the running session is untouched


@needs_vm
def test_snapshots_survive_restart_and_new_kernel(data_dir):
    k = MagicKernel(data_dir, notebook="persist.ipynb")
    try:
        k.ok("survivor = 'from the first kernel'")
        k.ok("%snapshot keep")
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=300)
        k.flush()
        reply, _ = k.execute("survivor")
        assert reply["status"] == "error"  # a restart is a fresh VM ...
        k.ok("%restore keep")  # ... and the snapshot is still there
        assert k.value("survivor") == "'from the first kernel'"
    finally:
        k.shutdown()
    other = MagicKernel(data_dir, notebook="someone-else.ipynb")
    try:
        reply, (err,) = other.error("%restore keep")  # another notebook never sees it
        assert "has no snapshots" in err["evalue"]
    finally:
        other.shutdown()
    again = MagicKernel(data_dir, notebook="persist.ipynb")
    try:
        again.ok("%restore keep")
        assert again.value("survivor") == "'from the first kernel'"
    finally:
        again.shutdown()


def _group_of(k: MagicKernel) -> str:
    """The group %snapshots names (its first line: "Group KEY: label")."""
    reply, outputs = k.execute("%snapshots")
    (shown,) = [m["content"]["data"]["text/plain"] for m in outputs
                if m["msg_type"] == "display_data"]
    m = re.match(r"Group (\S+): ", shown)
    assert m, shown
    return m.group(1)


def test_snapshots_survive_both_restarts_outside_jupyter_server(data_dir, kernel):
    """A plain jupyter_client frontend (nbclient, papermill, jupyter console): no notebook name;
    the group is the kernel's own, the same after restart_kernel() and restart_kernel(now=True).
    Another kernel (the module's, another notebook) lists it with --all, restores it as
    GROUP/NAME."""
    k = MagicKernel(data_dir, notebook=None)
    try:
        k.ok("survivor = 'before the restarts'")
        k.ok("%snapshot s1")
        group = _group_of(k)
        assert group == k.store().key  # derived from the connection file and session key
        for now in (False, True):  # shutdown_request with restart=True; kill and relaunch
            k.km.restart_kernel(now=now)
            k.kc.wait_for_ready(timeout=300)
            k.flush()
            reply, _ = k.execute("survivor")
            assert reply["status"] == "error", now  # a fresh VM ...
            assert _group_of(k) == group, now  # ... in the same group
            assert "Restored snapshot 's1'" in k.ok("%restore s1"), now
            assert k.value("survivor") == "'before the restarts'", now
    finally:
        k.shutdown()
    # From another kernel: a plain name stays in its own notebook, and says where to look.
    reply, (err,) = kernel.error("%restore s1")
    assert "%snapshots --all" in err["evalue"] and "GROUP/NAME" in err["evalue"]
    reply, outputs = kernel.execute("%snapshots --all")
    (listing,) = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
    text = listing["text/plain"]
    assert f"{group}/: s1" in text, text
    own_row = [ln for ln in text.splitlines() if ln.startswith(kernel.store().key)]
    assert own_row and "(this notebook)" in own_row[0], text
    assert f"{group}  " in text and "notebook path unknown" in text and "<table" in listing["text/html"]
    out = kernel.ok(f"%restore {group}/s1")
    assert f"Restored snapshot '{group}/s1'" in out and "notebook path unknown" in out, out
    assert kernel.value("survivor") == "'before the restarts'"
    out = kernel.ok(f"%snapshot --delete {group}/s1")
    assert f"Deleted snapshot '{group}/s1'" in out, out
    reply, (err,) = kernel.error(f"%restore {group}/s1")
    assert "no snapshot group" in err["evalue"]  # its last one: the group's folder went too


@needs_vm
def test_snapshot_mid_analysis_notebook(data_dir):
    path = Path(__file__).resolve().parents[2] / "notebooks" / "snapshot-mid-analysis.ipynb"
    nb = nbformat.read(path, as_version=4)
    use_kernelspec()
    env = dict(os.environ, JUPYTER_DATA_DIR=data_dir, JPY_SESSION_NAME=path.name)
    NotebookRunner(nb, kernel_name=KERNEL, timeout=600, startup_timeout=300).execute(env=env)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Restored snapshot 'cleaned'" in text


def test_restore_ahead_resumes_a_paused_vm_with_fresh_clock_and_random(kernel):
    kernel.ok("import os, random, time\nahead = 'at the snapshot'")
    kernel.ok("%snapshot ahead")
    kernel.ok("ahead = 'changed'")
    time.sleep(4)  # the standby is restored, greeted and paused in the background
    out = kernel.ok("%restore ahead")
    assert "restored ahead" in out, out
    assert kernel.value("ahead") == "'at the snapshot'"
    skew = float(kernel.value(f"time.time() - {time.time()}"))
    assert abs(skew) < 3.0, skew  # paused for seconds, yet the clock is the host's
    first = kernel.value("random.random(), os.urandom(8).hex()")
    kernel.ok("ahead = 'changed again'")
    time.sleep(4)  # after a %restore the same snapshot is restored ahead again
    out = kernel.ok("%restore ahead")
    assert "restored ahead" in out, out
    assert kernel.value("ahead") == "'at the snapshot'"
    assert kernel.value("random.random(), os.urandom(8).hex()") != first


def test_restore_ahead_never_hides_a_damaged_snapshot(kernel):
    kernel.ok("%snapshot damaged-later")
    time.sleep(4)  # its standby is ready and paused
    state = Path(kernel.store().path("damaged-later")) / "state"
    with open(state, "r+b") as f:
        f.seek(8)
        chunk = f.read(16)
        f.seek(8)
        f.write(bytes(b ^ 0xFF for b in chunk))
    reply, (err,) = kernel.error("%restore damaged-later")
    assert "corrupt" in err["evalue"], err["evalue"]
    assert kernel.value("6 * 7") == "42"


def test_restore_works_when_the_vm_restored_ahead_died(kernel):
    import signal
    import subprocess

    kernel.ok("ahead_victim = 'kept'")
    kernel.ok("%snapshot victim")
    time.sleep(4)  # its standby is ready and paused
    memory = os.path.join(kernel.store().path("victim"), "memory")
    pids = subprocess.run(["pgrep", "-f", memory], capture_output=True, text=True).stdout.split()
    assert pids, "no VM was restored ahead from the snapshot"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    out = kernel.ok("%restore victim")
    assert "Restored snapshot 'victim'" in out and "restored ahead" not in out, out
    assert kernel.value("ahead_victim") == "'kept'"
