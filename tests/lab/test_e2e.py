"""The extension end to end in a real browser against a real JupyterLab and a real microVM
kernel (tests/lab/e2e.js does the clicking): status item, snapshot and restore from the panel
(the variable comes back), the pool panel, a stuck cell ended by a second interrupt (issue
16), nothing for another kernel, and in Notebook 7 the
toolbar button and the snapshots panel (by its key chord). Screenshots are kept in
test-output/lab/e2e/."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import BACKEND, CHROMIUM, KERNEL, NODE_MODULES, OUTPUT, node_ready

pytestmark = [pytest.mark.vm, pytest.mark.skipif(BACKEND != "vm", reason="snapshots need the "
                                                 "vm backend")]


@pytest.mark.timeout(1800)
def test_snapshot_and_restore_from_the_panel(lab):
    why = node_ready()
    if why:
        pytest.fail(f"cannot run the browser test: {why}")
    nb = lab.notebook("e2e.ipynb", KERNEL, ["x = 1", "x = 2", "print('x is', x)",
                                                  "sum(range(10**13))", "print('after', 1 + 1)"])
    other = "-"
    if os.path.isdir(os.path.join(sys.prefix, "share", "jupyter", "kernels", "python3")):
        other = lab.notebook("plain.ipynb", "python3", ["1"])
    out = OUTPUT / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES), CHROMIUM=CHROMIUM)
    nb7 = "notebook7" if importlib.util.find_spec("notebook") else "-"
    run = subprocess.run(["node", os.path.join(os.path.dirname(__file__), "e2e.js"), lab.url, nb,
                          other, str(out), nb7], env=env, capture_output=True, text=True,
                         timeout=2400)
    (out / "e2e.log").write_text(run.stdout + run.stderr)  # steps, checks, page errors
    checks = [c for c in (json.loads(line) for line in run.stdout.splitlines()
                          if line.startswith("{")) if "check" in c]
    passed = [c["check"] for c in checks if c["ok"]]
    assert run.returncode == 0, (f"browser test failed after {passed}: "
                                 f"{[c['detail'] for c in checks if not c['ok']]}\n"
                                 f"{run.stderr[-2000:]}\nscreenshots: {out}; server log: "
                                 f"{lab.log}")
    assert passed[:6] == ["status item", "toolbar button", "snapshot from the panel",
                          "restore confirm dialog", "status item marks the restore",
                          "variable restored"], passed
    assert "pool panel" in passed
    assert {"second interrupt ends a stuck cell", "the kernel runs the next cell"} <= set(passed)
    assert (out / "4-restored.png").stat().st_size > 0
    if other != "-":
        assert "other kernel sees nothing" in passed
    if nb7 != "-":
        assert "notebook 7 panel and button" in passed
