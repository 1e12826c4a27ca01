"""Strings Python allows but UTF-8 does not (lone surrogates) reach the frontend as U+FFFD.

Every path from the guest into a Jupyter message: stream text, errors, mimebundles and their
metadata, comm data, completion and inspection replies. Nothing around them is lost."""
from __future__ import annotations

from .harness import stdout_of

REPLACEMENT = "\ufffd"


def test_error_with_lone_surrogate_still_replies(kernel):
    reply, outputs = kernel.execute("raise ValueError('bad \\ud800 value')")
    assert reply["status"] == "error"
    assert reply["ename"] == "ValueError"
    assert reply["evalue"] == f"bad {REPLACEMENT} value"
    [err] = [m for m in outputs if m["msg_type"] == "error"]
    assert err["content"]["evalue"] == f"bad {REPLACEMENT} value"
    assert any(REPLACEMENT in line for line in err["content"]["traceback"])
    # The kernel goes on normally.
    assert kernel.value("6 * 7") == "42"


def test_print_with_lone_surrogate_loses_nothing(kernel):
    reply, outputs = kernel.execute(
        "import os\nprint('A\\ud800B'); print('after')\n"
        "print(os.fsdecode(b'file-\\xff.txt'))")  # a surrogateescape'd file name
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == f"A{REPLACEMENT}B\nafter\nfile-{REPLACEMENT}.txt\n"


def test_display_data_and_metadata(kernel):
    reply, outputs = kernel.execute(
        "from IPython.display import display\n"
        "display({'text/plain': 'shown \\ud800', 'text/html': '<b>\\udc80</b>'},"
        " metadata={'note\\ud800': 'x\\udfff'}, raw=True)\n"
        "type('R', (), {'__repr__': lambda self: 'result \\ud800'})()")
    assert reply["status"] == "ok", reply
    [shown] = [m for m in outputs if m["msg_type"] == "display_data"]
    assert shown["content"]["data"] == {"text/plain": f"shown {REPLACEMENT}",
                                        "text/html": f"<b>{REPLACEMENT}</b>"}
    assert shown["content"]["metadata"] == {f"note{REPLACEMENT}": f"x{REPLACEMENT}"}
    [result] = [m for m in outputs if m["msg_type"] == "execute_result"]
    assert result["content"]["data"]["text/plain"] == f"result {REPLACEMENT}"


def test_comm_data_from_the_guest(kernel):
    reply, outputs = kernel.execute(
        "from comm import create_comm\n"
        "c = create_comm(target_name='smk-test-target', data={'k': 'open \\ud800'})\n"
        "c.send({'k': ['msg \\udc80']})")
    assert reply["status"] == "ok", reply
    [opened] = [m for m in outputs if m["msg_type"] == "comm_open"]
    assert opened["content"]["data"] == {"k": f"open {REPLACEMENT}"}
    sent = [m for m in outputs if m["msg_type"] == "comm_msg"]
    assert sent and sent[0]["content"]["data"] == {"k": [f"msg {REPLACEMENT}"]}


def test_complete_and_inspect_replies(kernel):
    # A file name that is not UTF-8: Python lists it with surrogateescape.
    reply, _ = kernel.execute(
        "import os, tempfile\n"
        "surrogate_dir = tempfile.mkdtemp()\n"
        "open(os.path.join(os.fsencode(surrogate_dir), b'name-\\xff.txt'), 'w').close()\n"
        "def surrogate_doc():\n    'doc with \\ud800 inside'\n")
    assert reply["status"] == "ok", reply
    folder = kernel.value("surrogate_dir").strip("'")
    code = f"open('{folder}/name-"
    content = kernel.reply(kernel.kc.complete(code, len(code)))
    assert content["status"] == "ok"
    assert any(f"name-{REPLACEMENT}.txt" in m for m in content["matches"]), content["matches"]
    content = kernel.reply(kernel.kc.inspect("surrogate_doc", 13))
    assert content["status"] == "ok" and content["found"]
    assert f"doc with {REPLACEMENT} inside" in content["data"]["text/plain"]
