"""report.py: the one message about what a sync left out, refused or kept twice."""
from __future__ import annotations

from supermachine_kernel.workspace.plan import Conflict
from supermachine_kernel.workspace.report import describe, human_size
from supermachine_kernel.workspace.scan import Limits, Skipped

GB = 1000 ** 3


def test_nothing_to_say_is_empty() -> None:
    assert describe([], Limits(), to_vm=True) == ""


def test_size_cap_message_names_the_file_the_size_the_limit_and_the_trait() -> None:
    msg = describe([Skipped("data/big.bin", "file_size", 2_100_000_000),
                    Skipped("link", "symlink"), Skipped("pipe", "special")],
                   Limits(max_file_bytes=GB), to_vm=True)
    assert msg.startswith("3 files were not copied to the VM: data/big.bin is 2.1 GB (limit "
                          "1 GB; raise it with c.MicroVMKernel.workspace_max_file_bytes)")
    assert "link is a symbolic link" in msg and "pipe is not a regular file" in msg
    assert "\n" not in msg


def test_one_file_from_the_vm() -> None:
    msg = describe([Skipped("out.bin", "total_bytes", 5)], Limits(), to_vm=False)
    assert msg.startswith("1 file was not copied from the VM to the workspace: out.bin")
    assert "workspace_max_total_bytes" in msg


def test_many_files_are_counted_not_listed() -> None:
    skipped = [Skipped(f"f{i:05d}", "file_count") for i in range(90_000)]
    msg = describe(skipped, Limits(max_files=10_000), to_vm=False, unlisted=5)
    assert msg.startswith("90005 files were not copied")
    # The limit and its setting once, five files named, the rest counted.
    assert msg.count("10000-file limit") == 1 and msg.count("workspace_max_files") == 1
    assert "f00004 is past it" in msg and "f00005" not in msg
    assert msg.endswith("; and 90000 more.")     # 90 000 - 5 named + 5 unlisted
    assert len(msg) < 1200


def test_refusals_and_conflicts_each_get_a_line() -> None:
    msg = describe([], Limits(), to_vm=False, refused=[("passwd", "a symlink is there")],
                   conflicts=[Conflict("a.csv", "a (guest copy 2026-12-06 081503).csv")])
    lines = msg.split("\n")
    assert lines[0] == "The workspace refused 1 write from the VM: passwd (a symlink is there)."
    assert "a.csv -> a (guest copy 2026-12-06 081503).csv" in lines[1]
    assert "workspace version was kept" in lines[1]


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 999, 1000, 1536, 2_100_000_000, 10 * GB)] == \
        ["0 B", "999 B", "1 kB", "1.5 kB", "2.1 GB", "10 GB"]


def test_clashes_say_what_to_do() -> None:
    msg = describe([], Limits(), to_vm=False, clashes=["results"])
    assert msg == ("1 path is a file on one side and a directory on the other, and was left "
                   "alone (rename one of them): results.")
    two = describe([], Limits(), to_vm=True, clashes=["a", "b"])
    assert two.startswith("2 paths are a file on one side and a directory on the other, and were")


def test_only_unlisted_entries_still_say_which_limit() -> None:
    assert describe([], Limits(max_files=7), to_vm=True, unlisted=3) == (
        "3 files were not copied to the VM: the workspace holds more than 7 files (raise the "
        "limit with c.MicroVMKernel.workspace_max_files).")
