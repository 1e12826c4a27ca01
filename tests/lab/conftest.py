"""Lab tests: the JupyterLab extension (labextension/) in a real JupyterLab and a real browser.

One JupyterLab server per test module (`lab`), started from the venv on 127.0.0.1 with no
token, serving a temporary root; its kernels keep their snapshots in a temporary Jupyter data
dir. The microVM kernelspec here, `smk-lab`, is displayed as "Python (microVM)" and runs
without warm spares (pool_min=0: on 2 cores a background restore slows everything down).
Browser tests drive Debian's chromium with playwright-core (labextension/node_modules) and
keep their screenshots under test-output/lab/ (make test leaves them there as artefacts).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND  # noqa: E402
from runtime.helpers import free_port  # noqa: E402

from supermachine_kernel.cli.install import install  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LABEXT = REPO / "labextension"
NODE_MODULES = LABEXT / "node_modules"
OUTPUT = REPO / "test-output" / "lab"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KERNEL = "smk-lab"
EXTENSION = "supermachine-kernel-labextension"


def node_ready() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (make setup installs it)"
    if not (NODE_MODULES / "playwright-core").is_dir():
        return "labextension/node_modules has no playwright-core (make setup runs npm ci)"
    if not os.path.exists(CHROMIUM):
        return "chromium is not installed (make setup installs it)"
    return None


@dataclass
class Lab:
    url: str
    root: Path
    env: dict
    log: Path

    def notebook(self, name: str, kernel: str, cells: list[str]) -> str:
        nb = {
            "cells": [{"id": f"cell-{i}", "cell_type": "code", "execution_count": None,
                       "metadata": {}, "outputs": [], "source": src}
                      for i, src in enumerate(cells)],
            "metadata": {"kernelspec": {"name": kernel, "display_name": kernel,
                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5,
        }
        (self.root / name).write_text(json.dumps(nb))
        return name


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server on 127.0.0.1 with the microVM kernelspec and the extension."""
    specs = tempfile.mkdtemp(prefix="smk-lab-specs-")
    install(prefix=specs, kernel_name=KERNEL, backend=BACKEND, interrupt_mode="message",
            display_name="Python (microVM)", extra_args=["--MicroVMKernel.pool_min=0"])
    root = Path(tempfile.mkdtemp(prefix="smk-lab-root-"))
    data = tempfile.mkdtemp(prefix="smk-lab-data-")
    config = tempfile.mkdtemp(prefix="smk-lab-config-")
    paths = [os.path.join(specs, "share", "jupyter"),
             *[p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]]
    env = dict(os.environ, JUPYTER_PATH=os.pathsep.join(paths), JUPYTER_DATA_DIR=data,
               JUPYTER_CONFIG_DIR=config, JUPYTERLAB_SETTINGS_DIR=os.path.join(config, "lab"),
               JUPYTERLAB_WORKSPACES_DIR=os.path.join(config, "workspaces"))
    env.pop("JPY_SESSION_NAME", None)
    port = free_port()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    log = OUTPUT / "lab-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
             f"--port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
             "--ServerApp.password=", "--allow-root", f"--ServerApp.root_dir={root}"],
            env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "api/status", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; see {log}") from None
                time.sleep(0.5)
        yield Lab(url, root, env, log)
    finally:
        proc.send_signal(signal.SIGTERM)  # SIGINT asks for confirmation and hangs
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(specs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(config, ignore_errors=True)
