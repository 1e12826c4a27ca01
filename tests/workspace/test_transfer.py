"""transfer.py: the guest listing read as hostile input, the guest scripts run for real, and
push/pull through the real agent's file API (agent on a unix socket, no QEMU)."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supermachine_kernel.workspace.host_writer import HostWriter
from supermachine_kernel.workspace.plan import TO_GUEST, TO_HOST, next_state, plan
from supermachine_kernel.workspace.report import describe
from supermachine_kernel.workspace.scan import DIR, FILE, Entry, Limits, Scan, scan
from supermachine_kernel.workspace.transfer import (
    GUEST_SOURCE,
    MAX_LISTING_BYTES,
    ListingError,
    list_guest,
    parse_guest_listing,
    pull,
    push,
    run_capped,
)

NOW = dt.datetime(2026, 12, 6, 8, 15, 3)


def listing(*rows: list, unlisted: int = 0) -> bytes:
    return json.dumps({"v": 1, "entries": list(rows), "unlisted": unlisted}).encode()


def reasons(s) -> dict[str, str]:
    return {k.path: k.reason for k in s.skipped}


# ---- parse_guest_listing: hostile listings ----

def test_a_plain_listing() -> None:
    s = parse_guest_listing(listing(["out", "dir", 0, 5, 0o755], ["out/a.png", "file", 3, 6, 0o644]),
                            Limits())
    assert s.entries["out/a.png"].size == 3 and s.entries["out"].kind == DIR
    assert s.skipped == [] and s.unlisted == 0


def test_symlink_to_etc_passwd_and_fifo_are_skipped() -> None:
    s = parse_guest_listing(listing(["passwd", "symlink", 0, 1, 0o777], ["pipe", "special", 0, 1, 0o644],
                                    ["ok", "file", 1, 1, 0o644]), Limits())
    assert set(s.entries) == {"ok"}
    assert reasons(s) == {"passwd": "symlink", "pipe": "special"}


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a//b", "x\0y", "\udcff",
                                 ".", "a/./b", "x" * 300])
def test_bad_names_are_skipped_never_admitted(bad: str) -> None:
    s = parse_guest_listing(listing([bad, "file", 1, 1, 0o644]), Limits())
    assert s.entries == {}
    assert [k.reason for k in s.skipped] == ["bad_name"]


def test_entries_under_something_not_a_listed_directory_are_dropped() -> None:
    s = parse_guest_listing(listing(["link", "symlink", 0, 1, 0o777], ["link/passwd", "file", 1, 1, 0o644],
                                    ["f", "file", 1, 1, 0o644], ["f/x", "file", 1, 1, 0o644],
                                    ["nodir/y", "file", 1, 1, 0o644]), Limits())
    assert set(s.entries) == {"f"}
    assert reasons(s) == {"link": "symlink", "f/x": "bad_name", "nodir/y": "bad_name"}


def test_excludes_apply_again_on_the_host() -> None:
    s = parse_guest_listing(listing([".git", "dir", 0, 1, 0o755], [".git/config", "file", 1, 1, 0o644],
                                    ["__pycache__", "dir", 0, 1, 0o755], [".env", "file", 1, 1, 0o600]),
                            Limits())
    assert set(s.entries) == {".env"} and s.skipped == []


@pytest.mark.parametrize("doc", [
    b"not json", b"\xff\xfe", b"[]", b'{"v": 2, "entries": []}', b'{"v": 1}',
    listing(["a", "file", -1, 1, 0o644]), listing(["a", "file", True, 1, 0o644]),
    listing(["a", "file", 1.5, 1, 0o644]), listing(["a", "file", 2 ** 64, 1, 0o644]),
    listing(["a", "blockdev", 1, 1, 0o644]), listing(["a", "file", 1, 1]),
    listing([7, "file", 1, 1, 0o644]), listing(["a", "file", 1, 1, 0o644], ["a", "file", 1, 1, 0o644]),
    listing(unlisted=-3), b"[" * 100_000 + b"]" * 100_000,
])
def test_malformed_listings_are_refused(doc: bytes) -> None:
    with pytest.raises(ListingError):
        parse_guest_listing(doc, Limits())


def test_oversized_listing_is_refused_before_decoding() -> None:
    with pytest.raises(ListingError, match="exceeds"):
        parse_guest_listing(b" " * (MAX_LISTING_BYTES + 1), Limits())


def test_sparse_10gb_file_in_the_guest_hits_the_size_cap() -> None:
    s = parse_guest_listing(listing(["big.bin", "file", 10 * 1000 ** 3, 1, 0o644]),
                            Limits(max_file_bytes=1000 ** 3))
    assert s.entries == {} and reasons(s) == {"big.bin": "file_size"}
    assert "big.bin is 10 GB (limit 1 GB" in describe(s.skipped, Limits(max_file_bytes=1000 ** 3), to_vm=False)


def test_100000_tiny_files_hit_the_count_cap_and_nothing_is_deleted() -> None:
    rows = [["many", "dir", 0, 1, 0o755]] + [[f"many/f{i:06d}", "file", 1, 1, 0o644] for i in range(100_000)]
    limits = Limits(max_files=10_000)
    s = parse_guest_listing(listing(*rows), limits)
    # The listing holds at most max_files + EXTRA_ENTRIES rows; the rest is counted.
    assert len(s.entries) == 10_000 and s.unlisted == 100_001 - 11_000
    assert len(s.skipped) == 1000 and {k.reason for k in s.skipped} == {"file_count"}
    msg = describe(s.skipped, limits, to_vm=False, unlisted=s.unlisted)
    assert msg.startswith("90001 files were not copied from the VM") and len(msg) < 1000
    # An incomplete listing never deletes host files it did not name.
    host = parse_guest_listing(listing(*rows[:20]), limits)
    host.entries["many/zzz"] = host.entries["many/f000001"]
    state = next_state({}, plan({}, host, Scan(), TO_GUEST, NOW), host, Scan())
    assert not plan(state, host, s, TO_HOST, NOW).delete_on_host


# ---- guest_side.py's list, run for real (by the host's Python: the script is stdlib only) ----

def run_guest_list(root: Path, limits: Limits) -> bytes:
    opt = {"excludes": list(limits.excludes), "hidden": limits.exclude_hidden_dirs,
           "max_entries": limits.max_files + 1000}
    return subprocess.run([sys.executable, "-I", "-S", "-c", GUEST_SOURCE, "list", str(root), json.dumps(opt)],
                          check=True, capture_output=True, timeout=60).stdout


def test_guest_list_agrees_with_the_host_scan(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f.txt").write_text("hello")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    (tmp_path / "passwd").symlink_to("/etc/passwd")
    os.mkfifo(tmp_path / "pipe")
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(10 * 1000 ** 3)
    limits = Limits(max_file_bytes=1000 ** 3)
    guest = parse_guest_listing(run_guest_list(tmp_path, limits), limits)
    host = scan(tmp_path, limits)
    assert guest.entries == host.entries
    assert sorted(reasons(guest).items()) == sorted(reasons(host).items()) == \
        [("passwd", "symlink"), ("pipe", "special"), ("sparse", "file_size")]


# ---- push / pull through the real agent (unix socket) ----

def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_push_then_pull_round_trip_through_the_agent(agent_vm, tmp_path: Path, guest_root: Path) -> None:
    host_root = tmp_path / "host-ws"
    (host_root / "data").mkdir(parents=True)
    (host_root / "data" / "in.csv").write_bytes(b"a,b\n1,2\n" * 1000)
    (host_root / "notes.md").write_text("# notes")
    (host_root / "empty").mkdir()
    limits = Limits()
    host = scan(host_root, limits)
    p = plan({}, host, list_guest(agent_vm, str(guest_root), limits), TO_GUEST, NOW)
    out = push(agent_vm, str(host_root), str(guest_root), p, host)
    assert out.refused == []
    assert tree(guest_root) == tree(host_root)
    guest = list_guest(agent_vm, str(guest_root), limits)
    state = next_state({}, p, host, guest)
    def sigs(sc):
        return {p: e.signature() for p, e in sc.entries.items()}
    assert sigs(guest) == sigs(host)              # file mtimes carried over, so...
    assert plan(state, host, guest, TO_HOST, NOW).empty()   # ...nothing to bring back

    # "A cell": a new file, a changed one, a deleted one, a symlink out, a FIFO.
    (guest_root / "out").mkdir()
    (guest_root / "out" / "plot.png").write_bytes(b"\x89PNG" + bytes(5000))
    (guest_root / "notes.md").write_text("# notes, edited in the guest")
    (guest_root / "data" / "in.csv").unlink()
    (guest_root / "passwd").symlink_to("/etc/passwd")
    os.mkfifo(guest_root / "fifo")
    guest = list_guest(agent_vm, str(guest_root), limits)
    host = scan(host_root, limits)
    q = plan(state, host, guest, TO_HOST, NOW)
    with HostWriter(host_root) as w:
        got = pull(agent_vm, w, str(guest_root), q, guest, limits)
    assert got.refused == []
    assert (host_root / "out" / "plot.png").read_bytes() == b"\x89PNG" + bytes(5000)
    assert (host_root / "notes.md").read_text() == "# notes, edited in the guest"
    assert not (host_root / "data" / "in.csv").exists()
    assert not (host_root / "passwd").exists() and not (host_root / "fifo").exists()
    assert {k.path for k in guest.skipped} == {"passwd", "fifo"}
    state = next_state(state, q, host, guest)
    assert plan(state, scan(host_root, limits), guest, TO_GUEST, NOW).empty()


def test_conflict_keeps_the_host_version_and_saves_the_guest_one(agent_vm, tmp_path: Path,
                                                                  guest_root: Path) -> None:
    host_root = tmp_path / "host-ws"
    host_root.mkdir()
    (host_root / "a.csv").write_text("v1")
    limits = Limits()
    host = scan(host_root, limits)
    p = plan({}, host, list_guest(agent_vm, str(guest_root), limits), TO_GUEST, NOW)
    push(agent_vm, str(host_root), str(guest_root), p, host)
    state = next_state({}, p, host, list_guest(agent_vm, str(guest_root), limits))
    (host_root / "a.csv").write_text("host v2")
    (guest_root / "a.csv").write_text("guest v2!")
    host, guest = scan(host_root, limits), list_guest(agent_vm, str(guest_root), limits)
    q = plan(state, host, guest, TO_GUEST, NOW)
    assert [c.path for c in q.conflicts] == ["a.csv"]
    with HostWriter(host_root) as w:
        assert pull(agent_vm, w, str(guest_root), q, guest, limits).refused == []
    assert push(agent_vm, str(host_root), str(guest_root), q, host).refused == []
    assert (host_root / "a.csv").read_text() == "host v2"
    assert (host_root / "a (guest copy 2026-12-06 081503).csv").read_text() == "guest v2!"
    assert (guest_root / "a.csv").read_text() == "host v2"


def test_pull_refuses_a_file_grown_past_the_cap_after_the_listing(agent_vm, tmp_path: Path,
                                                                   guest_root: Path) -> None:
    host_root = tmp_path / "host-ws"
    host_root.mkdir()
    (guest_root / "grow.bin").write_bytes(b"x" * 10)
    limits = Limits(max_file_bytes=1000)
    guest = list_guest(agent_vm, str(guest_root), limits)
    (guest_root / "grow.bin").write_bytes(b"x" * 5000)
    q = plan({}, scan(host_root, limits), guest, TO_HOST, NOW)
    with HostWriter(host_root) as w:
        got = pull(agent_vm, w, str(guest_root), q, guest, limits)
    assert [p for p, _ in got.refused] == ["grow.bin"]
    assert list(host_root.iterdir()) == []


# ---- run_capped: the guest's "python3" may be anything ----

def test_a_guest_flooding_stdout_is_cut_off_at_the_cap(agent_vm) -> None:
    with pytest.raises(ListingError, match="more than 100000 bytes"):
        run_capped(agent_vm, ["sh", "-c", "yes flood"], 100_000, 60.0)


def test_a_guest_that_never_finishes_is_cut_off_at_the_deadline(agent_vm) -> None:
    with pytest.raises(ListingError, match="did not finish"):
        run_capped(agent_vm, ["sleep", "30"], 1000, 0.5)


def test_run_capped_passes_stdin_and_the_exit_code(agent_vm) -> None:
    assert run_capped(agent_vm, ["sh", "-c", "cat; exit 3"], 1000, 60.0, stdin=b"in") == (3, b"in")


# ---- pull's file stream: swaps after the listing, and forged streams ----

def test_swaps_after_the_listing_are_refused_and_the_rest_still_copied(agent_vm, tmp_path: Path,
                                                                        guest_root: Path) -> None:
    host_root = tmp_path / "host-ws"
    host_root.mkdir()
    for name in ("zero", "fifo", "gone", "ok"):
        (guest_root / name).write_text(name)
    limits = Limits(max_file_bytes=1000)
    guest = list_guest(agent_vm, str(guest_root), limits)
    (guest_root / "zero").unlink()
    (guest_root / "zero").symlink_to("/dev/zero")       # would stream forever if followed
    (guest_root / "fifo").unlink()
    os.mkfifo(guest_root / "fifo")                       # would block if opened for reading
    (guest_root / "gone").unlink()
    q = plan({}, scan(host_root, limits), guest, TO_HOST, NOW)
    assert q.to_host == ["fifo", "gone", "ok", "zero"]
    with HostWriter(host_root) as w:
        got = pull(agent_vm, w, str(guest_root), q, guest, limits, timeout=60)
    assert sorted(p for p, _ in got.refused) == ["fifo", "gone", "zero"]
    assert got.copied == ["ok"] and sorted(os.listdir(host_root)) == ["ok"]


class CannedChild:
    """A guest process whose stdout is `data` (for forged `read` streams)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.killed = bytearray(data), False

    def write_stdin(self, data: bytes) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    def read_stdout(self, n: int, timeout: float) -> bytes:
        out = bytes(self.data[:min(n, 7)])    # small pieces: the reader must reassemble
        del self.data[:len(out)]
        return out

    def poll(self) -> None:
        return None

    def signal(self, signum: int) -> None:
        self.killed = True


class CannedVm:
    def __init__(self, data: bytes) -> None:
        self.child = CannedChild(data)

    def spawn(self, argv: list, **kw: object) -> CannedChild:
        return self.child


def frame(head: dict, body: bytes = b"", status: bytes = b"") -> bytes:
    h = json.dumps(head).encode()
    return len(h).to_bytes(4, "big") + h + body + status


def pull_canned(tmp_path: Path, stream: bytes, names: list[str], cap: int = 1000):
    host_root = tmp_path / "host-ws"
    host_root.mkdir(exist_ok=True)
    guest = Scan(entries={n: Entry(FILE, 3, 5, 0o644) for n in names})
    q = plan({}, Scan(), guest, TO_HOST, NOW)
    vm = CannedVm(stream)
    with HostWriter(host_root) as w:
        got = pull(vm, w, "/ws", q, guest, Limits(max_file_bytes=cap), timeout=5)
    return got, host_root, vm


def test_a_well_formed_stream_is_written_with_the_listed_mtime(tmp_path: Path) -> None:
    got, root, vm = pull_canned(tmp_path, frame({"size": 3, "mode": 0o600}, b"abc", b"\0")
                                + frame({"error": "No such file"}), ["a", "b"])
    assert got.copied == ["a"] and got.refused == [("b", "could not be read in the VM: No such file")]
    assert (root / "a").read_bytes() == b"abc" and (root / "a").stat().st_mtime_ns == 5
    assert vm.child.killed


def test_a_file_that_shrank_while_read_is_dropped_and_the_next_still_copied(tmp_path: Path) -> None:
    got, root, _ = pull_canned(tmp_path, frame({"size": 3}, b"ab\0", b"\1")
                               + frame({"size": 3}, b"xyz", b"\0"), ["a", "b"])
    assert [p for p, _ in got.refused] == ["a"] and got.copied == ["b"]
    assert sorted(os.listdir(root)) == ["b"]            # no temp file left behind


@pytest.mark.parametrize("stream", [
    frame({"size": 10 ** 12}, b""),                     # past the cap: nothing read or written
    frame({"size": 3}, b"ab"),                          # ends early
    (10 ** 6).to_bytes(4, "big") + b"{}",               # oversized header
    b"\0\0\0\3[1,",                                     # header not JSON
    frame({"size": -1}),
    frame({"size": 3}, b"abc"),                         # no status byte
])
def test_forged_streams_write_nothing(tmp_path: Path, stream: bytes) -> None:
    got, root, vm = pull_canned(tmp_path, stream, ["a"])
    assert got.copied == [] and [p for p, _ in got.refused] == ["a"]
    assert os.listdir(root) == [] and vm.child.killed


def test_push_into_a_guest_that_cannot_hold_the_files_refuses_each_and_goes_on(agent_vm, tmp_path: Path) -> None:
    host_root = tmp_path / "host-ws"
    (host_root / "d").mkdir(parents=True)
    (host_root / "d" / "a").write_text("a")
    (host_root / "b").write_text("b")
    host = scan(host_root, Limits())
    p = plan({}, host, Scan(), TO_GUEST, NOW)
    out = push(agent_vm, str(host_root), "/proc/sm-no-such-workspace", p, host)
    refused = dict(out.refused)
    assert out.copied == [] and {"d", "d/a", "b"} <= set(refused)
    assert refused["b"].startswith("could not be written in the VM")
