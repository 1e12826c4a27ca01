"""The extension as installed by make setup: `jupyter labextension list` shows it enabled, and
`python -m jupyterlab.browser_check` passes with it loaded (in Debian's chromium: the check's
own `npx playwright install` would download a browser: an `npx` ahead on PATH skips that, and
its app dir's `playwright` is a shim over playwright-core with executablePath)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import CHROMIUM, EXTENSION, NODE_MODULES, OUTPUT, node_ready

SHIM = """// playwright for jupyterlab.browser_check: playwright-core driving the system's chromium.
const core = require(process.env.PLAYWRIGHT_CORE);
const launch = core.chromium.launch.bind(core.chromium);
const chromium = Object.create(core.chromium);
chromium.launch = (options = {}) => launch({
  executablePath: process.env.CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
  ...options
});
module.exports = { ...core, chromium };
"""
# Ahead of npx on PATH: `npx playwright install BROWSER` has nothing to download.
NPX = """#!/bin/sh
if [ "$1" = playwright ] && [ "$2" = install ]; then
    echo "playwright shim: using $CHROMIUM"; exit 0
fi
exec "$REAL_NPX" "$@"
"""


def _jupyter(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_labextension_list_shows_it_enabled():
    run = _jupyter("jupyter", "labextension", "list")
    text = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)  # colours
    assert run.returncode == 0, text
    line = next((ln for ln in text.splitlines() if EXTENSION in ln), None)
    assert line is not None, text
    assert re.search(r"enabled\s.*OK", line), line
    installed = Path(sys.prefix, "share", "jupyter", "labextensions", EXTENSION)
    meta = json.loads((installed / "package.json").read_text())
    assert meta["jupyterlab"]["_build"]["load"].startswith("static/remoteEntry.")


def _app_dir(tmp: Path) -> Path:
    """The venv's lab app dir, linked entry by entry, plus browser_test/ with the shim."""
    real = Path(sys.prefix, "share", "jupyter", "lab")
    app = tmp / "lab"
    app.mkdir()
    for entry in real.iterdir():
        if entry.name != "browser_test":
            (app / entry.name).symlink_to(entry)
    pkg = app / "browser_test" / "node_modules" / "playwright"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "playwright", "main": "index.js"}))
    (pkg / "index.js").write_text(SHIM)
    npx = tmp / "bin" / "npx"
    npx.parent.mkdir()
    npx.write_text(NPX)
    npx.chmod(0o755)
    return app


def test_browser_check_passes():
    why = node_ready()
    if why:
        pytest.fail(f"cannot run the browser check: {why}")
    out = OUTPUT / "browser_check"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smk-browser-check-") as tmp:
        app = _app_dir(Path(tmp))
        env = dict(os.environ, CHROMIUM=CHROMIUM, REAL_NPX=shutil.which("npx") or "npx",
                   PATH=os.pathsep.join([os.path.join(tmp, "bin"), os.environ["PATH"]]),
                   PLAYWRIGHT_CORE=str(NODE_MODULES / "playwright-core"),
                   JLAB_BROWSER_CHECK_OUTPUT=str(out),
                   JUPYTER_CONFIG_DIR=os.path.join(tmp, "config"),
                   JUPYTER_DATA_DIR=os.path.join(tmp, "data"))
        env["JUPYTERLAB_DIR"] = str(app)  # where the check looks for browser_test/
        run = _jupyter("jupyterlab.browser_check", "--allow-root", env=env, cwd=tmp)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    assert "playwright shim: using" in text, text[-4000:]  # the check ran in the browser
