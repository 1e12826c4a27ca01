"""The guest REPL's warm-up after a restore: armed by the first hello after a restore, never ahead
of a waiting request, invisible to the user (no output, no execution count, history, `_` or
namespace change, no event callbacks).

The driver runs in a host subprocess with a recording channel; a restore is simulated by changing
the generation file the driver reads (renamed into place, as the agent does).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from supermachine_kernel.repl_client.backend import GUEST_DRIVER

# Loads the driver from argv[1] as `repl`, its generation file (argv[2]) reading "1".
PROLOGUE = textwrap.dedent("""
    import importlib.util, json, os, queue, signal, sys
    spec = importlib.util.spec_from_file_location("repl", sys.argv[1])
    repl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repl)
    gen = sys.argv[2]
    repl.GENERATION_FILE = gen
    with open(gen, "w") as f:
        f.write("1")
""")

SCRIPT = PROLOGUE + textwrap.dedent("""
    sent = []
    class Channel:
        def send(self, msg):
            json.dumps(msg, default=repl._json_default)
            sent.append(msg["type"])
    repl.state.channel = Channel()
    repl.state.output = repl.Output(repl.state.channel)
    repl.state.generation = repl._read_generation()
    executor = repl.IPythonExecutor()
    driver = repl.Driver(executor, None)
    driver.warm_up = []
    shell = executor.shell
    calls = []
    shell.events.register("post_execute", lambda: calls.append("post_execute"))
    shell.events.register("pre_run_cell", lambda info: calls.append("pre_run_cell"))
    shell.run_cell("a = 41", store_history=True)
    calls.clear()
    before = dict(count=shell.execution_count, hist=len(shell.history_manager.input_hist_raw),
                  names=sorted(k for k in shell.user_ns if not k.startswith("_")),
                  last=shell.user_ns.get("_"))

    out = {}
    driver.do_hello({"type": "hello"})            # no restore: nothing armed
    out["armed_without_restore"] = len(driver.warm_up)
    with open(gen + ".tmp", "w") as f:
        f.write("2")                              # a restore happened: the agent renames a
    os.replace(gen + ".tmp", gen)                 # new file into place, as on every hello
    del sent[:]
    driver.do_hello({"type": "hello"})
    out["armed_after_restore"] = len(driver.warm_up)
    out["sent_by_hello"] = list(sent)
    driver.do_hello({"type": "hello"})            # a second host attaching: not armed again
    out["armed_twice"] = len(driver.warm_up)
    import queue
    requests = queue.SimpleQueue()
    requests.put({"type": "execute", "id": 1})
    first = driver.next_request(requests)         # a waiting request goes first
    out["first_request"] = [first["type"], len(driver.warm_up)]
    del sent[:]
    while driver.warm_up:
        driver.warm_up.pop(0)()                   # each step must succeed on its own
    repl.state.output.flush(fds=True)
    out["sent_by_warm_up"] = list(sent)
    out["callbacks"] = calls
    out["before"] = before
    out["after"] = dict(count=shell.execution_count, hist=len(shell.history_manager.input_hist_raw),
                        names=sorted(k for k in shell.user_ns if not k.startswith("_")),
                        last=shell.user_ns.get("_"))
    driver.do_hello({"type": "hello"})
    out["grace_after_hello"] = driver.attached    # a host is about to send its first request
    driver.do_hello({"type": "hello", "idle": True})
    out["grace_after_idle_hello"] = driver.attached  # restored ahead: warm up at once
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)
""")


def run_driver_script(tmp_path, source: str) -> dict:
    """Runs `source` in a host subprocess with the guest driver's path, a generation file and
    a result file as arguments; returns what it wrote there."""
    script = tmp_path / "drive.py"
    script.write_text(source)
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(script), str(GUEST_DRIVER),
                           str(tmp_path / "generation"), str(result)],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(result.read_text())


def test_warm_up_after_restore_is_invisible(tmp_path):
    out = run_driver_script(tmp_path, SCRIPT)
    assert out["armed_without_restore"] == 0
    assert out["armed_after_restore"] > 0
    assert out["sent_by_hello"] == ["ready"]
    assert out["armed_twice"] == out["armed_after_restore"]  # unchanged, not doubled
    assert out["first_request"] == ["execute", out["armed_after_restore"]]  # no step ran first
    assert out["sent_by_warm_up"] == []
    assert out["callbacks"] == []
    assert out["after"] == out["before"]
    assert out["grace_after_hello"] is True and out["grace_after_idle_hello"] is False


NOTIFY_SCRIPT = PROLOGUE + textwrap.dedent("""
    class Channel:
        requests = queue.SimpleQueue()
        def send(self, msg, hold=False):
            pass
    repl.state.channel = Channel()
    repl.state.output = repl.Output(repl.state.channel)
    repl.state.generation_stamp = repl._generation_stamp()
    repl.state.generation = repl._read_generation()
    os.environ[repl.NOTIFY_HELLO_ENV] = str(int(signal.SIGUSR2))
    out = {"signum": repl.install_hello_notification(),
           "env_left": repl.NOTIFY_HELLO_ENV in os.environ}
    driver = repl.Driver(repl.PlainExecutor(), None)
    driver.warm_up = []
    with open(gen + ".tmp", "w") as f:
        f.write("2")
    os.replace(gen + ".tmp", gen)                 # the agent's Hello after a restore...
    os.kill(os.getpid(), signal.SIGUSR2)          # ...and its signal
    req = Channel.requests.get(timeout=5)         # the main thread wakes to queue it
    out["request"] = req
    driver.handle(req)
    out["armed"] = len(driver.warm_up)
    out["attached"] = driver.attached             # no host yet: no grace before warming up
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)
""")


def test_the_agents_hello_signal_starts_the_warm_up(tmp_path):
    out = run_driver_script(tmp_path, NOTIFY_SCRIPT)
    assert out["signum"] == 12 and out["env_left"] is False  # SIGUSR2; hidden from user code
    assert out["request"] == {"type": "restored"}
    assert out["armed"] > 0 and out["attached"] is False
