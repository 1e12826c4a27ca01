"""The guest REPL without IPython (plain executor): the same protocol, simpler output."""
from __future__ import annotations

import asyncio

import pytest

from supermachine_kernel.repl_client import GuestRepl, guest_environment
from supermachine_kernel.repl_client.local import LocalBackend


@pytest.fixture(scope="module")
def no_ipython(tmp_path_factory):
    """A PYTHONPATH entry whose IPython package refuses to import."""
    root = tmp_path_factory.mktemp("no-ipython")
    (root / "IPython").mkdir()
    (root / "IPython" / "__init__.py").write_text("raise ImportError('no IPython here')\n")
    return str(root)


def run(no_ipython, scenario):
    events = []

    async def main():
        loop = asyncio.get_running_loop()
        session = GuestRepl(LocalBackend(spares=0), loop, lambda k, c, b: events.append((k, c)),
                               env=guest_environment({"PYTHONPATH": no_ipython}),
                               startup_timeout=60)
        try:
            info = await session.wait_ready()
            assert info.executor == "plain"
            return await scenario(session)
        finally:
            await session.shutdown()

    return asyncio.run(main()), events


def execute(session, code, **kw):
    args = dict(code=code, silent=False, store_history=True, user_expressions={},
                allow_stdin=False, execution_count=kw.pop("count", 1))
    args.update(kw)
    return session.request("execute", **args)


def test_plain_execute_paths(no_ipython):
    async def scenario(s):
        out = {}
        out["print"] = await execute(s, "print('hi')\nx = 20", count=1)
        out["expr"] = await execute(s, "x + 1", count=2)
        out["error"] = await execute(s, "1/0", count=3)
        out["display"] = await execute(s, "display(x)", count=4)
        out["syntax"] = await execute(s, "def (", count=5)
        out["ue"] = await execute(s, "y = 2", user_expressions={"a": "x*y"}, count=6)
        out["await"] = await execute(s, "import asyncio\nawait asyncio.sleep(0)\n'awaited'",
                                     count=7)
        return out

    out, events = run(no_ipython, scenario)
    assert out["print"]["status"] == "ok"
    assert ("stream", {"name": "stdout", "text": "hi\n"}) in events
    results = [c for k, c in events if k == "execute_result"]
    assert results[0] == {"data": {"text/plain": "21"}, "metadata": {}, "execution_count": 2}
    assert out["error"]["status"] == "error" and out["error"]["ename"] == "ZeroDivisionError"
    assert any("ZeroDivisionError" in line for line in out["error"]["traceback"])
    assert any(k == "display_data" and c["data"]["text/plain"] == "20" for k, c in events)
    assert out["syntax"]["ename"] == "SyntaxError"
    assert out["ue"]["user_expressions"]["a"]["data"]["text/plain"] == "40"
    assert results[-1]["data"]["text/plain"] == "'awaited'"


def test_plain_introspection(no_ipython):
    async def scenario(s):
        await execute(s, "import collections\nvalue = 3", count=1)
        return (
            await s.request("complete", code="collections.Ordered", cursor_pos=19),
            await s.request("inspect", code="collections.OrderedDict", cursor_pos=5,
                            detail_level=0, omit_sections=[]),
            await s.request("is_complete", code="for i in x:"),
            await s.request("is_complete", code="x = ("),
            await s.request("is_complete", code="1 +* 2"),
            await s.request("is_complete", code="x = 1"),
            await s.request("history", hist_access_type="tail", output=False, raw=True, n=5),
        )

    (comp, insp, inc1, inc2, bad, ok, hist), _ = run(no_ipython, scenario)
    assert "collections.OrderedDict" in comp["matches"]
    assert comp["cursor_start"] == 0 and comp["cursor_end"] == 19
    assert insp["found"] and "OrderedDict" in insp["data"]["text/plain"]
    assert inc1["status"] == "incomplete" and inc1["indent"] == "    "
    assert inc2["status"] == "incomplete"
    assert bad["status"] == "invalid"
    assert ok["status"] == "complete"
    assert hist.get("history") == [[1, 1, "import collections\nvalue = 3"]], hist


def test_plain_matplotlib_figures_become_png(no_ipython):
    pytest.importorskip("matplotlib")

    async def scenario(s):
        return await execute(s, "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nNone")

    reply, events = run(no_ipython, scenario)
    assert reply["status"] == "ok", reply
    assert any(k == "display_data" and "image/png" in c["data"] for k, c in events)
