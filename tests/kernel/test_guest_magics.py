"""IPython magics and display idioms in the guest, compared with plain ipykernel.

Each case runs the same cells in the microVM kernel and in plain ipykernel (the venv's `python3`
kernelspec) and compares what a frontend sees: the reply status, the payload sources, the IOPub
message types with their mimetypes in order, and which streams were written (stream text may
differ in addresses and timings). What the guest answers differently on purpose (package
installers, desktop GUIs, an editor) is checked for a message that says why and what to do.
"""
from __future__ import annotations

import re
import threading
import time

import pytest

from .harness import BACKEND, SLOW, Kernel, stderr_of, stdout_of

PLAIN = "python3"

# Cells run in order in one kernel of each kind; a case may rely on the cases before it.
CASES = [
    ("matplotlib-inline", ["%matplotlib inline"]),
    ("matplotlib-default", ["%matplotlib"]),
    ("matplotlib-svg", ["%config InlineBackend.figure_format = 'svg'\n"
                        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);"]),
    ("matplotlib-png", ["%config InlineBackend.figure_format = 'png'\nplt.plot([3, 2]);"]),
    ("gui-off", ["%gui"]),
    ("gui-qt", ["%gui qt"]),
    ("time", ["%time t = sum(range(10))", "%%time\nt2 = 2"]),
    ("timeit", ["%timeit -n 2 -r 2 sum(range(10))"]),
    ("capture", ["%%capture cap\nprint('hidden')", "cap.stdout"]),
    ("html", ["%%html\n<b>bold</b>"]),
    ("javascript", ["%%javascript\nconsole.log(1)"]),
    ("markdown", ["%%markdown\n# Title"]),
    ("writefile-load-run", ["%%writefile smk_magic_mod.py\nprint('from file')\nVALUE = 5",
                            "%load smk_magic_mod.py", "%run smk_magic_mod.py", "VALUE",
                            "import smk_magic_mod\nsmk_magic_mod.VALUE"]),
    ("env", ["%env SMK_MAGIC=on", "%env SMK_MAGIC", "import os\nos.environ['SMK_MAGIC']"]),
    ("cd", ["%cd .", "%pwd"]),
    ("who", ["who_var = 1\n%who", "%whos"]),
    ("autoreload", ["%load_ext autoreload\n%autoreload 2",
                    "%%writefile smk_auto_mod.py\ndef answer():\n    return 1",
                    "import smk_auto_mod\nsmk_auto_mod.answer()",
                    "%%writefile smk_auto_mod.py\ndef answer():\n    return 2",
                    "smk_auto_mod.answer()"]),
    ("history", ["%history -l 2"]),
    ("xmode", ["%xmode Plain", "1/0", "%xmode Context"]),
    ("precision", ["%precision 3", "3.14159265", "%precision"]),
    ("shell", ["!echo from-shell", "files = !echo a b\nfiles", "%%bash\necho out-bash"]),
    ("bash-stderr", ["%%bash\necho err-bash >&2"]),
    ("display", ["from IPython.display import display, HTML\n"
                 "h = display(HTML('<i>a</i>'), display_id=True)\nh.update(HTML('<i>b</i>'))"]),
    ("clear-output", ["from IPython.display import clear_output\nprint('x')\nclear_output()"]),
    ("tqdm-notebook", ["from tqdm.notebook import tqdm\nfor i in tqdm(range(3)): pass"]),
    ("tqdm-auto", ["from tqdm.auto import tqdm\nfor i in tqdm(range(3)): pass"]),
    ("pip-present", ["%pip install --disable-pip-version-check numpy"]),
    ("reset", ["reset_me = 1\n%reset -f", "'reset_me' in dir()"]),
    # After %reset IPython turns clear/less/more/man into shell aliases unless magics of
    # those names exist, as ipykernel's do.
    ("clear", ["%clear"]),
    ("less", ["%%writefile smk_less.txt\nsome text", "%less smk_less.txt", "%more smk_less.txt"]),
]


def shape(reply: dict, outputs: list[dict]) -> tuple:
    """What must match between the kernels: status, payload sources, the non-stream messages
    in order (consecutive repeats merged: progress bars update at their own pace), the
    stream names written."""
    items: list[tuple] = []
    streams = set()
    for m in outputs:
        kind, content = m["msg_type"], m["content"]
        if kind == "stream":
            if content["text"]:
                streams.add(content["name"])
            continue
        if kind in ("display_data", "update_display_data", "execute_result"):
            item = (kind, tuple(sorted(content["data"])),
                    "display_id" in (content.get("transient") or {}))
        elif kind == "error":
            item = (kind, content["ename"])
        else:
            item = (kind,)
        if not items or items[-1] != item:
            items.append(item)
    payload = tuple(p.get("source") for p in reply.get("payload") or [])
    return reply["status"], payload, tuple(items), tuple(sorted(streams))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Plain ipykernel, working in a scratch directory as the guest does."""
    k = Kernel(PLAIN)
    reply, _ = k.execute("%%cd %s" % tmp_path_factory.mktemp("plain-ipykernel"))
    assert reply["status"] == "ok", reply
    yield k
    k.shutdown()


@pytest.fixture(scope="module")
def guest(kernel, tmp_path_factory):
    """The microVM kernel in a scratch directory of its own (not the directory the REPL driver
    was started from: `import` of a module written there must work through '' on sys.path)."""
    scratch = "/tmp/smk-magics" if BACKEND == "vm" else str(tmp_path_factory.mktemp("guest"))
    reply, _ = kernel.execute("import os\nos.makedirs(%r, exist_ok=True)\n%%cd %s"
                              % (scratch, scratch))
    assert reply["status"] == "ok", reply
    return kernel


@pytest.mark.parametrize("cells", [c for _, c in CASES], ids=[name for name, _ in CASES])
def test_same_as_ipykernel(guest, plain, cells):
    for cell in cells:
        want = plain.execute(cell, timeout=60)
        got = guest.execute(cell, timeout=60)
        assert shape(*got) == shape(*want), (cell, got, want)


def test_matplotlib_messages(guest):
    reply, outputs = guest.execute("%matplotlib")
    assert reply["status"] == "ok"
    assert "Using matplotlib backend: inline" in stdout_of(outputs)
    reply, outputs = guest.execute("import matplotlib.pyplot as plt\n"
                                   "%config InlineBackend.figure_format = 'svg'\n"
                                   "plt.plot([0, 1]);")
    figures = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
    assert len(figures) == 1 and "<svg" in figures[0]["image/svg+xml"], outputs
    guest.execute("%config InlineBackend.figure_format = 'png'")


@pytest.mark.parametrize("cell", ["%gui qt", "%matplotlib qt", "%matplotlib tk", "%qtconsole"])
def test_desktop_gui_says_there_is_no_display(guest, cell):
    reply, outputs = guest.execute(cell)
    assert "needs a display" in stderr_of(outputs), outputs
    assert "%matplotlib inline" in stderr_of(outputs)
    assert "NotImplementedError" not in str(outputs)
    assert guest.value("1 + 1") == "2"


@pytest.mark.parametrize("cell", ["%pip install numpy smk-not-in-image",
                                  "%pip install -r requirements.txt", "%pip --version",
                                  "%conda install smk-not-in-image",
                                  "%uv pip install smk-not-in-image"])
def test_installers_say_why_not(guest, cell):
    reply, outputs = guest.execute(cell)
    assert reply["status"] == "ok", reply
    err = stderr_of(outputs)
    assert "no package installer in this microVM guest" in err, outputs
    assert "image" in err
    assert "No module named" not in err + stdout_of(outputs)
    if "smk-not-in-image" in cell:
        assert "Not in this image: smk-not-in-image" in err
        if "numpy" in cell:
            assert "Already in this image: numpy" in err


def test_installers_list_the_image(guest):
    listed = stdout_of(guest.execute("%pip list")[1])
    assert "numpy" in listed and "tqdm" in listed and "Package" in listed
    frozen = stdout_of(guest.execute("%pip freeze")[1]).splitlines()
    assert any(line.startswith("ipython==") for line in frozen), frozen
    shown = stdout_of(guest.execute("%pip show tqdm")[1])
    assert "Name: tqdm" in shown and "Version:" in shown


@pytest.mark.parametrize("cell, says", [("%edit", "%%writefile"), ("%ed x", "%load"),
                                        ("%connect_info", "on the host")])
def test_vm_less_magics_explain(guest, cell, says):
    reply, outputs = guest.execute(cell)
    assert reply["status"] == "error" and reply["ename"] == "UsageError", reply
    assert says in stderr_of(outputs)


def test_man_pages_or_why_not(guest):
    """%man pages a man page as ipykernel does where the image has `man` (the default image
    has not, the local backend's host may)."""
    reply, outputs = guest.execute("%man ls")
    if reply["status"] == "ok":
        assert [p["source"] for p in reply["payload"]] == ["page"], reply
    else:
        assert reply["ename"] == "UsageError"
        assert "no man pages" in stderr_of(outputs) and "!ls --help" in stderr_of(outputs)


def test_debug_post_mortem_through_input_requests(guest, plain):
    """%debug reads its commands with input_request, as in ipykernel."""
    setup = "def smk_fails():\n    local_value = 41\n    return 1 / 0\nsmk_fails()"
    for k in (guest, plain):
        prompts: list[str] = []
        answers = ["p local_value + 1", "q"]

        def on_input(req, prompts=prompts, answers=answers):
            prompts.append(req["content"]["prompt"])
            return answers.pop(0) if answers else "q"

        reply, _ = k.execute(setup)
        assert reply["status"] == "error"
        reply, outputs = k.execute("%debug", allow_stdin=True, on_input=on_input)
        assert reply["status"] == "ok", reply
        assert prompts[:2] == ["ipdb> ", "ipdb> "], prompts
        assert "42" in stdout_of(outputs)


def test_pdb_on_enters_debugger_after_an_error(guest):
    prompts: list[str] = []

    def on_input(req):
        prompts.append(req["content"]["prompt"])
        return "q"

    guest.execute("%pdb on")
    try:
        reply, _ = guest.execute("1/0", allow_stdin=True, on_input=on_input)
    finally:
        guest.execute("%pdb off")
    assert reply["status"] == "error"
    assert prompts == ["ipdb> "]


def test_interrupt_traceback_shows_only_user_frames(guest, plain):
    """Interrupting a busy loop: the traceback names the cell, never the REPL's own frames."""
    tracebacks = {}
    for name, k in (("guest", guest), ("plain", plain)):
        started = threading.Event()

        def interrupt(k=k, started=started):
            started.wait(30 * SLOW)
            time.sleep(0.5)
            k.km.interrupt_kernel()

        threading.Thread(target=interrupt, daemon=True).start()
        reply, outputs = k.execute("print('go', flush=True)\nwhile True: pass", timeout=60,
                                   on_iopub=lambda m, s=started: m["msg_type"] == "stream"
                                   and s.set())
        assert reply["ename"] == "KeyboardInterrupt", reply
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        assert len(errors) == 1
        tracebacks[name] = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0]["traceback"]))
    for text in tracebacks.values():
        assert "Cell In[" in text and "while True" in text, text
    assert "repl" not in tracebacks["guest"] and "_on_sigint" not in tracebacks["guest"]
    # as many frames as plain ipykernel shows (the cell's only)
    assert tracebacks["guest"].count("Cell In[") == tracebacks["plain"].count("Cell In[")
    assert tracebacks["guest"].count(", in ") == tracebacks["plain"].count(", in ")
