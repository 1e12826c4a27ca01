"""The magic registry and dispatcher, without a kernel: cell splitting, help, load failures."""
from __future__ import annotations

import asyncio

from supermachine_kernel import magics


class FakeIopub:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []
        self.cell_parent = None

    def publish(self, msg_type: str, content: dict, **kw) -> None:
        self.published.append((msg_type, content))


class FakeKernel:
    """Just what the dispatcher touches when no magic needs a VM."""

    def __init__(self) -> None:
        self.iopub = FakeIopub()
        self.published = self.iopub.published
        self.host_magics = None


def test_cells_without_our_magics_go_to_the_guest_untouched():
    k = FakeKernel()
    for code in ("x = 1", "print('%d' % 3)", "%timeit 1 + 1", "%%bash\necho hi", "%snapshotx"):
        assert asyncio.run(magics.dispatch(k, code)) == (code, None)
    assert k.published == []


def test_split_cell_leading_magics_only():
    known = {"snapshot", "vm"}.__contains__
    found, rest = magics.split_cell("\n# note\n%snapshot a b\n%vm\nx = 1\n%vm\n", known)
    assert [m.group("name") for m in found] == ["snapshot", "vm"]
    assert found[0].group("args") == "a b"
    assert rest == "x = 1\n%vm\n"
    found, rest = magics.split_cell("%vm?", known)
    assert found[0].group("help") == "?" and rest == ""


def test_magic_that_fails_to_load_is_reported_not_fatal(monkeypatch):
    registry = magics.Registry(("vm", "does_not_exist"))
    assert "vm" in registry.magics
    assert "ModuleNotFoundError" in registry.failed["does_not_exist"]
    assert "failed to load" in registry.help("does_not_exist")
    host = magics.HostMagics(FakeKernel())
    host.registry = registry
    code, reply = asyncio.run(host.run_cell("%does_not_exist", silent=False))
    assert reply["status"] == "error" and reply["ename"] == "MagicLoadError"
    assert host.kernel.published[0][0] == "error"


def test_help_and_usage_errors_need_no_vm():
    k = FakeKernel()
    code, reply = asyncio.run(magics.dispatch(k, "%restore?"))
    assert reply["status"] == "ok"
    assert "latest snapshot" in reply["payload"][0]["data"]["text/plain"]
    code, reply = asyncio.run(magics.dispatch(k, "%snapshots --nope"))
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    assert k.published[-1][0] == "error"
