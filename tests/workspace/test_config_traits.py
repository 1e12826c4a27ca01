"""The workspace traits in kernel/config.py: "sync" by default ($SUPERMACHINE_KERNEL_WORKSPACE
overrides it; tests/conftest.py sets it to "off" for the test kernels), mapped onto
scan.Limits."""
from __future__ import annotations

import pytest
from traitlets import TraitError
from traitlets.config import Config

from supermachine_kernel.kernel.config import GuestConfig, guest_config_from_argv
from supermachine_kernel.workspace.scan import Limits


def test_default_is_sync_and_limits_are_the_scan_defaults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERMACHINE_KERNEL_WORKSPACE", raising=False)
    g = GuestConfig()
    assert g.workspace == "sync"
    assert g.workspace_limits() == Limits()


def test_the_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERMACHINE_KERNEL_WORKSPACE", "off")
    assert GuestConfig().workspace == "off"
    assert GuestConfig(workspace="read-only").workspace == "read-only"


def test_config_reaches_the_limits() -> None:
    g = GuestConfig(config=Config({"GuestConfig": {
        "workspace": "read-only", "workspace_max_file_bytes": 10, "workspace_max_total_bytes": 20,
        "workspace_max_files": 3, "workspace_exclude": ["node_modules"],
        "workspace_exclude_hidden_dirs": False}}))
    assert g.workspace == "read-only"
    assert g.workspace_limits() == Limits(10, 20, 3, ("node_modules",), False)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(TraitError):
        GuestConfig(workspace="both")


def test_from_a_kernelspec_command_line() -> None:
    g = guest_config_from_argv(["--MicroVMKernel.workspace=sync",
                                "--MicroVMKernel.workspace_max_files=5"])
    assert g.workspace == "sync" and g.workspace_limits().max_files == 5
