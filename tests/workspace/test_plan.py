"""plan.py: the two passes per cell, conflicts, deletes, and what is left alone."""
from __future__ import annotations

import datetime as dt

from supermachine_kernel.workspace.plan import (
    TO_GUEST,
    TO_HOST,
    Conflict,
    Synced,
    conflict_name,
    next_state,
    plan,
)
from supermachine_kernel.workspace.scan import DIR, FILE, Entry, Scan, Skipped

NOW = dt.datetime(2026, 12, 6, 8, 15, 3)


def f(size: int = 1, mtime: int = 1) -> Entry:
    return Entry(FILE, size, mtime, 0o644)


def d() -> Entry:
    return Entry(DIR, 0, 7, 0o755)


def sc(**entries: Entry) -> Scan:
    return Scan(entries={k.replace("__", "/"): v for k, v in entries.items()})


def synced(*paths_entries: tuple[str, Entry]) -> dict:
    return {p: Synced(e.signature(), e.signature()) for p, e in paths_entries}


def test_first_sync_copies_the_host_tree_parents_first() -> None:
    host = sc(data=d(), data__a=f(), b=f())
    p = plan({}, host, Scan(), TO_GUEST, NOW)
    assert p.to_guest == ["b", "data", "data/a"]
    assert not p.to_host and not p.conflicts


def test_nothing_changed_is_an_empty_plan_both_ways() -> None:
    host = guest = sc(data=d(), data__a=f())
    state = synced(("data", d()), ("data/a", f()))
    assert plan(state, host, guest, TO_GUEST, NOW).empty()
    assert plan(state, host, guest, TO_HOST, NOW).empty()


def test_each_pass_carries_only_its_own_sides_changes() -> None:
    state = synced(("h", f()), ("g", f()))
    host = sc(h=f(2, 2), g=f())
    guest = sc(h=f(), g=f(3, 3), new=f())
    before = plan(state, host, guest, TO_GUEST, NOW)
    assert before.to_guest == ["h"] and not before.to_host
    after = plan(state, host, guest, TO_HOST, NOW)
    assert after.to_host == ["g", "new"] and not after.to_guest


def test_deletes_children_first() -> None:
    state = synced(("a", d()), ("a/b", d()), ("a/b/c", f()))
    guest = sc(a=d(), a__b=d(), a__b__c=f())
    p = plan(state, Scan(), guest, TO_GUEST, NOW)
    assert p.delete_in_guest == ["a/b/c", "a/b", "a"]
    q = plan(state, guest, Scan(), TO_HOST, NOW)
    assert q.delete_on_host == ["a/b/c", "a/b", "a"]


def test_file_changed_on_both_sides_is_a_conflict_host_kept_guest_saved_beside() -> None:
    state = synced(("out/plot.png", f()))
    host = Scan(entries={"out": d(), "out/plot.png": f(5, 5)})
    guest = Scan(entries={"out": d(), "out/plot.png": f(9, 9)})
    for direction in (TO_GUEST, TO_HOST):
        p = plan(state, host, guest, direction, NOW)
        assert p.conflicts == [Conflict("out/plot.png", "out/plot (guest copy 2026-12-06 081503).png")]
        assert "out/plot.png" in p.to_guest and "out/plot.png" not in p.to_host
        assert not p.delete_on_host


def test_conflict_name_avoids_taken_names_and_handles_dotfiles() -> None:
    first = conflict_name("a.tar.gz", NOW)
    assert first == "a.tar (guest copy 2026-12-06 081503).gz"
    assert conflict_name("a.tar.gz", NOW, {first}) == "a.tar (guest copy 2026-12-06 081503 2).gz"
    assert conflict_name(".env", NOW) == ".env (guest copy 2026-12-06 081503)"
    long = conflict_name("x" * 250 + ".csv", NOW)
    assert len(long.encode()) <= 255 and long.endswith("(guest copy 2026-12-06 081503).csv")


def test_changed_beats_deleted() -> None:
    state = synced(("x", f()))
    # Host deleted x, guest changed it: nothing is deleted; the guest's version comes back.
    p = plan(state, Scan(), sc(x=f(2, 2)), TO_GUEST, NOW)
    assert p.empty()
    q = plan(state, Scan(), sc(x=f(2, 2)), TO_HOST, NOW)
    assert q.to_host == ["x"] and not q.delete_on_host
    # Guest deleted x, host changed it: the host's version goes back in.
    r = plan(state, sc(x=f(2, 2)), Scan(), TO_HOST, NOW)
    assert r.empty() and not r.delete_on_host
    assert plan(state, sc(x=f(2, 2)), Scan(), TO_GUEST, NOW).to_guest == ["x"]


def test_skipped_paths_are_left_alone() -> None:
    state = synced(("big", f()))
    host = Scan(skipped=[Skipped("big", "file_size", 10**10)])
    guest = sc(big=f())
    assert plan(state, host, guest, TO_GUEST, NOW).empty()
    guest_sym = Scan(skipped=[Skipped("big", "symlink")])
    assert plan(state, sc(big=f()), guest_sym, TO_HOST, NOW).empty()


def test_incomplete_guest_listing_never_deletes() -> None:
    state = synced(("a", f()), ("b", f()))
    guest = Scan(entries={"a": f()}, unlisted=5)
    assert plan(state, sc(a=f(), b=f()), guest, TO_HOST, NOW).empty()


def test_kind_clash_is_left_alone_and_listed() -> None:
    state = synced(("x", f()))
    p = plan(state, sc(x=f(2, 2)), sc(x=d()), TO_HOST, NOW)
    assert p.clashes == ["x"] and p.empty()


def test_next_state_after_a_pass_makes_the_next_plan_empty() -> None:
    host = sc(data=d(), data__a=f(), b=f())
    p = plan({}, host, Scan(), TO_GUEST, NOW)
    state = next_state({}, p, host, Scan())
    # The copies carried the host's signature (mtime set in the guest by the transfer).
    guest = sc(data=d(), data__a=f(), b=f())
    assert plan(state, host, guest, TO_GUEST, NOW).empty()
    assert plan(state, host, guest, TO_HOST, NOW).empty()
    # A guest delete after that: the after-cell pass deletes on the host, then all agree.
    guest2 = sc(data=d(), b=f())
    q = plan(state, host, guest2, TO_HOST, NOW)
    assert q.delete_on_host == ["data/a"]
    state2 = next_state(state, q, host, guest2)
    assert "data/a" not in state2
    assert plan(state2, sc(data=d(), b=f()), guest2, TO_GUEST, NOW).empty()


def test_a_waiting_change_keeps_its_old_state() -> None:
    state = synced(("g", f()))
    host, guest = sc(g=f()), sc(g=f(3, 3))
    p = plan(state, host, guest, TO_GUEST, NOW)
    assert p.empty()
    assert next_state(state, p, host, guest)["g"] == state["g"]
    assert plan(next_state(state, p, host, guest), host, guest, TO_HOST, NOW).to_host == ["g"]


def test_without_state_equal_files_agree_and_different_ones_conflict() -> None:
    host = sc(same=f(3, 9), differs=f(3, 9), only_host=f())
    guest = sc(same=f(3, 9), differs=f(4, 10), only_guest=f())
    p = plan({}, host, guest, TO_GUEST, NOW)
    assert p.to_guest == ["differs", "only_host"]
    assert [c.path for c in p.conflicts] == ["differs"]
    assert not p.delete_in_guest and not p.delete_on_host
    state = next_state({}, p, host, guest)
    assert state["same"] == Synced(f(3, 9).signature(), f(3, 9).signature())
    after_push = sc(same=f(3, 9), differs=f(3, 9), only_host=f(), only_guest=f())
    assert plan(state, host, after_push, TO_HOST, NOW).to_host == ["only_guest"]
