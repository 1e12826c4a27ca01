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
    # Readable by every user of the prefix (a JupyterHub's users), not mkdtemp's 0700.
    assert spec_dir.stat().st_mode & 0o777 == 0o755

    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "share" / "jupyter"))
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                            check=True, capture_output=True, text=True, env=env).stdout
    specs = json.loads(listed)["kernelspecs"]
    assert specs["python-microvm"]["spec"]["display_name"] == "Python (microVM)"


def test_builtin_spec_matches_template():
    from supermachine_kernel.cli import install

    assert install._DEFAULT_SPEC == json.loads((install._REPO_TEMPLATE / "kernel.json").read_text())


def _install(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "supermachine_kernel", "install", "--prefix", str(tmp_path), *args],
        capture_output=True, text=True)


def test_an_environment_kernelspec_carries_its_image_and_packages(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("attrs\n")
    r = _install(tmp_path, "--name", "py312-sklearn", "--image", "python:3.12-slim",
                 "--packages", "scikit-learn==1.6.1", "polars", "--requirements", str(reqs))
    assert r.returncode == 0, r.stderr
    assert "supermachine-kernel prepare --kernel py312-sklearn" in r.stdout
    spec_dir = tmp_path / "share" / "jupyter" / "kernels"
    spec = json.loads((spec_dir / "py312-sklearn" / "kernel.json").read_text())
    assert spec["argv"][1:] == [
        "-m", "supermachine_kernel.kernel", "-f", "{connection_file}",
        "--MicroVMKernel.image=python:3.12-slim",
        "--MicroVMKernel.packages=scikit-learn==1.6.1", "--MicroVMKernel.packages=polars",
        f"--MicroVMKernel.requirements={reqs}",
    ]
    assert spec["metadata"]["supermachine"] == {
        "image": "python:3.12-slim", "packages": ["scikit-learn==1.6.1", "polars"],
        "requirements": str(reqs)}
    assert spec["display_name"] == "Python (microVM: python:3.12-slim, scikit-learn==1.6.1, polars)"
    assert not (spec_dir / "python-microvm").exists(), "the default kernelspec is left alone"

    # The kernel reads the environment back from that argv.
    from supermachine_kernel.kernel.config import guest_config_from_argv

    config = guest_config_from_argv(spec["argv"][1:])
    assert (config.image, config.packages, config.requirements) == (
        "python:3.12-slim", ["scikit-learn==1.6.1", "polars"], str(reqs))
    options = config.backend_options()
    assert (options["image"], options["packages"], options["requirements"]) == (
        "python:3.12-slim", ["scikit-learn==1.6.1", "polars"], str(reqs))


def test_an_environment_needs_its_own_name_and_an_existing_requirements_file(tmp_path):
    r = _install(tmp_path, "--image", "python:3.12-slim")
    assert r.returncode == 2 and "--name" in r.stderr
    r = _install(tmp_path, "--name", "x", "--requirements", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt does not exist" in r.stderr
    assert not (tmp_path / "share" / "jupyter" / "kernels").exists()


def test_each_environment_has_its_own_launch_hint_and_build_command(tmp_path, monkeypatch):
    from supermachine_kernel import __version__
    from supermachine_kernel.cli.install import kernel_json
    from supermachine_kernel.kernel.config import guest_config_from_argv, kernelspec_of
    from supermachine_kernel.startup.hint import hint_key

    for name, extra in (("env-a", ["--image", "oci:/a:v1"]),
                        ("env-b", ["--image", "oci:/a:v1", "--packages", "six"])):
        assert _install(tmp_path, "--name", name, *extra).returncode == 0
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    a = kernel_json(image="oci:/a:v1")["argv"]
    b = kernel_json(image="oci:/a:v1", packages=["six"])["argv"]
    keys = {hint_key(argv[1:] + ["-f", "/run/kernel-1.json"], {}, __version__) for argv in (a, b)}
    assert len(keys) == 2, "the launch hint key differs per environment"

    kernel_argv = ["-f", "/run/kernel-7.json", *b[5:]]  # as the kernel process sees it
    assert kernelspec_of(kernel_argv) == "env-b"
    monkeypatch.setattr(sys, "argv", ["kernel", *kernel_argv])
    assert guest_config_from_argv(kernel_argv).build_command() == \
        "supermachine-kernel prepare --kernel env-b"
    monkeypatch.setattr(sys, "argv", ["kernel", "-f", "x.json", "--MicroVMKernel.image=oci:/c"])
    unknown = guest_config_from_argv(sys.argv[1:])
    unknown.packages = ["six", "attrs>=23"]
    assert unknown.build_command() == \
        "supermachine-kernel prepare --image oci:/c --packages six 'attrs>=23'"
