"""Output: streamed while running, fd-level capture, rich displays, rate limiting."""
from __future__ import annotations

import base64
import time

from .harness import KERNEL, SLOW, Kernel, stderr_of, stdout_of


def test_stream_arrives_while_cell_runs(kernel):
    stamps = []
    t0 = time.monotonic()
    reply, outputs = kernel.execute(
        "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
        on_iopub=lambda m: m["msg_type"] == "stream" and stamps.append(time.monotonic() - t0))
    total = time.monotonic() - t0
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == "first\nsecond\n"
    assert stamps[0] < total - 1.5, (stamps, total)


def test_subprocess_and_c_level_output_captured(kernel):
    reply, outputs = kernel.execute(
        "import subprocess, ctypes, os\n"
        "subprocess.run(['sh', '-c', 'echo from-child; echo child-err >&2'])\n"
        "ctypes.CDLL(None).printf(b'from-libc\\n')\n"
        "os.write(1, b'raw-fd\\n')\n")
    assert reply["status"] == "ok"
    out = stdout_of(outputs)
    for text in ("from-child", "from-libc", "raw-fd"):
        assert text in out
    assert "child-err" in stderr_of(outputs)


def test_print_and_display_keep_order(kernel):
    reply, outputs = kernel.execute(
        "from IPython.display import display\nprint('a')\ndisplay('b')\nprint('c')")
    kinds = [(m["msg_type"], m["content"].get("text") or m["content"].get("data", {}).get("text/plain"))
             for m in outputs]
    assert kinds == [("stream", "a\n"), ("display_data", "'b'"), ("stream", "c\n")]


def test_matplotlib_inline_png(kernel):
    reply, outputs = kernel.execute(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()", timeout=120)
    assert reply["status"] == "ok", reply
    pngs = [m for m in outputs if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
    assert pngs
    assert base64.b64decode(pngs[0]["content"]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_pandas_html_execute_result(kernel):
    reply, outputs = kernel.execute(
        "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})", timeout=120)
    assert reply["status"] == "ok", reply
    result = [m for m in outputs if m["msg_type"] == "execute_result"][0]
    assert "<table" in result["content"]["data"]["text/html"]


def test_update_display_and_clear_output(kernel):
    reply, outputs = kernel.execute(
        "from IPython.display import display, clear_output\n"
        "h = display('one', display_id=True)\nh.update('two')\nclear_output(wait=True)")
    types = [m["msg_type"] for m in outputs]
    assert types == ["display_data", "update_display_data", "clear_output"]
    did = outputs[0]["content"]["transient"]["display_id"]
    assert outputs[1]["content"]["transient"]["display_id"] == did
    assert outputs[1]["content"]["data"]["text/plain"] == "'two'"
    assert outputs[2]["content"]["wait"] is True


def test_user_expressions_and_silent(kernel):
    reply, outputs = kernel.execute("zz = 5", user_expressions={"double": "zz*2", "bad": "1/0"})
    assert reply["user_expressions"]["double"]["data"]["text/plain"] == "10"
    assert reply["user_expressions"]["bad"]["status"] == "error"
    reply, outputs = kernel.execute("zz + 1", silent=True)
    assert reply["status"] == "ok"
    assert not [m for m in outputs if m["msg_type"] == "execute_result"]


def test_execution_count_follows_kernel(kernel):
    reply1, out1 = kernel.execute("'a'")
    reply2, out2 = kernel.execute("'b'")
    assert reply2["execution_count"] == reply1["execution_count"] + 1
    result = [m for m in out2 if m["msg_type"] == "execute_result"][0]
    assert result["content"]["execution_count"] == reply2["execution_count"]


def test_magics_run_in_guest(kernel):
    reply, outputs = kernel.execute("%time x = sum(range(10))\n%who_ls")
    assert reply["status"] == "ok", reply
    reply, outputs = kernel.execute("!echo shell-escape")
    assert "shell-escape" in stdout_of(outputs)


def test_moderate_output_arrives_whole(kernel):
    reply, outputs = kernel.execute("print('y' * 3_000_000)", timeout=60)
    assert reply["status"] == "ok"
    assert len(stdout_of(outputs)) == 3_000_001


def test_history_keeps_a_bounded_copy_of_cell_output(kernel):
    """IPython's history records a cell's stream output (for %notebook) only up to a cap, in
    whole writes; the frontend still gets everything."""
    reply, outputs = kernel.execute(
        "import sys\nprint('small')\nsys.stdout.write('z' * 2_000_000)\nprint('after')", timeout=60)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == "small\n" + "z" * 2_000_000 + "after\n"
    recorded = kernel.value(
        "''.join(t for o in get_ipython().history_manager.outputs[%d] "
        "if o.output_type == 'out_stream' for t in o.bundle['stream'])" % reply["execution_count"])
    assert recorded == repr("small\n")


def test_large_output_arrives_whole_and_in_order_without_rate_limit():
    """21 MB of stdout (ASCII and multi-byte characters) around displays and stderr: every
    character arrives, in order, with nothing dropped when the rate limit is off."""
    k = Kernel(KERNEL, extra_arguments=["--MicroVMKernel.iopub_data_rate_limit=0"])
    try:
        reply, outputs = k.execute(
            "import sys\nfrom IPython.display import display\n"
            "for i in range(12):\n"
            "    sys.stdout.write(''.join('%07d %s\\n' % (j, 'é€😀' if j % 3 else 'x' * 9)"
            " for j in range(i * 100_000, (i + 1) * 100_000)))\n"
            "    if i % 4 == 3:\n"
            "        sys.stdout.flush()\n"
            "        display(i)\n"
            "        sys.stderr.write('err %d\\n' % i)\n"
            "        sys.stderr.flush()\n", timeout=300)
        assert reply["status"] == "ok", reply
        stdout = stdout_of(outputs)
        lines = ["%07d %s\n" % (j, "é€😀" if j % 3 else "x" * 9) for j in range(1_200_000)]
        expected = "".join(lines)
        assert len(stdout) == len(expected) and stdout == expected
        assert stderr_of(outputs) == "err 3\nerr 7\nerr 11\n"
        # each display comes after exactly the stdout written before it
        seen = 0
        for m in outputs:
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout":
                seen += len(m["content"]["text"])
            elif m["msg_type"] == "display_data":
                i = int(m["content"]["data"]["text/plain"])
                assert seen == len("".join(lines[:(i + 1) * 100_000])), (i, seen)
    finally:
        k.shutdown()


def test_large_output_is_rate_limited():
    k = Kernel(KERNEL, extra_arguments=["--MicroVMKernel.iopub_data_rate_limit=1000000",
                                        "--MicroVMKernel.rate_limit_window=1"])
    try:
        reply, outputs = k.execute(
            "import sys\nfor _ in range(40):\n    sys.stdout.write('z' * 1_000_000 + '\\n')\n",
            timeout=120)
        assert reply["status"] == "ok"
        got = len(stdout_of(outputs))
        assert got < 20_000_000, got
        err = stderr_of(outputs)
        assert "IOPub output rate exceeded" in err
        assert "were dropped in this cell" in err
        t0 = time.monotonic()
        assert k.value("1+1") == "2"
        assert time.monotonic() - t0 < 5 * SLOW
    finally:
        k.shutdown()


def test_top_level_await_still_runs(kernel):
    """The REPL skips IPython's await probe only for cells without `await`/`async`."""
    code = ("import asyncio\nasync def f():\n    await asyncio.sleep(0)\n    return 41\n"
            "async def agen():\n    yield 1\n")
    reply, _ = kernel.execute(code)
    assert reply["status"] == "ok"
    for cell, expected in (("await f() + 1", "42"), ("[x async for x in agen()]", "[1]")):
        reply, outputs = kernel.execute(cell)
        assert reply["status"] == "ok", reply
        results = [m["content"]["data"]["text/plain"] for m in outputs
                   if m["msg_type"] == "execute_result"]
        assert results == [expected]


def test_trailing_semicolon_still_silences_the_result(kernel):
    def results(cell):
        reply, outputs = kernel.execute(cell)
        assert reply["status"] == "ok", reply
        return [m["content"]["data"]["text/plain"] for m in outputs
                if m["msg_type"] == "execute_result"]

    assert results("20 + 1") == ["21"]
    assert results("20 + 2;") == []
    assert results("20 + 3;  # a comment") == []
    assert results("s = 'a;b'\ns") == ["'a;b'"]  # a `;` elsewhere: IPython's own check decides
