"""The kernelspec installer and what `jupyter kernelspec list` then shows."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_install_prefix_and_kernelspec_list(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "supermachine_kernel", "install", "--prefix", str(tmp_path)],
        check=True, capture_output=True, text=True).stdout
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "python-microvm"
    assert str(spec_dir) in out
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["display_name"] == "Python (microVM)"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] in ("signal", "message")
    assert spec["argv"][0] == sys.executable
    assert spec["argv"][1:] == ["-m", "supermachine_kernel.kernel", "-f", "{connection_file}"]

    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "share" / "jupyter"))
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                            check=True, capture_output=True, text=True, env=env).stdout
    specs = json.loads(listed)["kernelspecs"]
    assert specs["python-microvm"]["spec"]["display_name"] == "Python (microVM)"


def test_builtin_spec_matches_template():
    from supermachine_kernel.cli import install

    assert install._DEFAULT_SPEC == json.loads((install._REPO_TEMPLATE / "kernel.json").read_text())
