"""%snapshot: capture, names, --force, --delete, --report, help, placement, failures as errors."""
from __future__ import annotations

import os
import re

from .conftest import stdout_of


def test_snapshot_prints_name_size_and_time(kernel):
    kernel.ok("import numpy as np; kept = np.ones(1 << 20)")
    out = kernel.ok("%snapshot")
    m = re.search(r"Snapshot 'snap-1': ([\d.]+) (KiB|MiB|GiB) on disk, taken in ([\d.]+) s", out)
    assert m, out
    nb = kernel.store()
    (entry,) = nb.entries()
    assert entry.name == "snap-1" and entry.size_bytes > 0 and entry.repl_id is not None
    assert os.path.isfile(os.path.join(nb.path("snap-1"), "metadata.json"))
    # Sizes are disk usage (allocated blocks, holes cost nothing), not the files' lengths;
    # filesystems may allocate a little past a file's end, so compare with what stat reports.
    root = nb.path("snap-1")
    allocated = sum(os.lstat(os.path.join(d, f)).st_blocks * 512
                    for d, _, fs in os.walk(root) for f in fs)
    assert abs(entry.size_bytes - allocated) <= 1 << 20, (entry.size_bytes, allocated)


def test_named_duplicate_and_force(kernel):
    assert "Snapshot 'keep'" in kernel.ok("%snapshot keep")
    reply, (err,) = kernel.error("%snapshot keep")
    assert err["ename"] == "SnapshotError"
    assert "already exists" in err["evalue"] and "--force" in err["evalue"]
    before = kernel.store().get("keep").created
    assert "Snapshot 'keep'" in kernel.ok("%snapshot --force keep")
    assert kernel.store().get("keep").created > before


def test_delete_and_report(kernel):
    out = kernel.ok("%snapshot --report")
    assert "this notebook" in out and "Total:" in out
    out = kernel.ok("%snapshot --delete keep")
    assert re.search(r"Deleted snapshot 'keep': freed [\d.]+ (KiB|MiB|GiB)", out), out
    assert not os.path.exists(kernel.store().path("keep"))
    reply, (err,) = kernel.error("%snapshot --delete keep")
    assert "no snapshot named 'keep'" in err["evalue"] and "snap-1" in err["evalue"]
    reply, (err,) = kernel.error("%snapshot --delete")
    assert err["ename"] == "UsageError"


def test_bad_names_and_placement_are_cell_errors(kernel):
    reply, (err,) = kernel.error("%snapshot ../escape")
    assert "invalid snapshot name" in err["evalue"]
    reply, (err,) = kernel.error("x = 1\n%snapshot late")
    assert err["ename"] == "UsageError" and "must come first" in err["evalue"]
    assert not os.path.exists(kernel.store().path("late"))
    reply, (err,) = kernel.error("%snapshot --bogus")
    assert err["ename"] == "UsageError"


def test_magic_then_code_in_one_cell(kernel):
    reply, outputs = kernel.execute("%snapshot with-code\nprint('code ran', 6 * 7)")
    assert reply["status"] == "ok"
    out = stdout_of(outputs)
    assert out.index("Snapshot 'with-code'") < out.index("code ran 42")


def test_help_is_the_docstring(kernel):
    reply, outputs = kernel.execute("%snapshot?")
    assert reply["status"] == "ok"
    (page,) = reply["payload"]
    assert page["source"] == "page"
    assert "Capture the whole microVM" in page["data"]["text/plain"]
    assert "--delete" in page["data"]["text/plain"]


def test_rename(kernel):
    assert "Snapshot 'before-rename'" in kernel.ok("%snapshot before-rename")
    out = kernel.ok("%snapshot --rename before-rename after-rename")
    assert out.strip() == "Renamed snapshot 'before-rename' to 'after-rename'."
    names = [e.name for e in kernel.store().entries()]
    assert "after-rename" in names and "before-rename" not in names
    reply, outputs = kernel.execute("%snapshots")
    shown = "".join(m["content"]["data"]["text/plain"] for m in outputs
                    if m["msg_type"] == "display_data")
    assert "*after-rename" in shown, shown  # the session's origin follows the name
    reply, (err,) = kernel.error("%snapshot --rename after-rename")
    assert err["ename"] == "UsageError"
    reply, (err,) = kernel.error("%snapshot one two")
    assert err["ename"] == "UsageError" and "--rename" in err["traceback"][-1]
