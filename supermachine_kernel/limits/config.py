"""The limits an admin sets once for every user of a host (`c.MicroVMLimits.<trait>`), and where
they are read from.

They live in one admin-owned file, `/etc/supermachine-kernel/limits.py` (a traitlets config
file; `SUPERMACHINE_LIMITS_FILE` names another one), never in a user's Jupyter config: a limit
a user could raise in `~/.jupyter` would be no limit. The Hub's `jupyterhub_config.py` loads the
same file (`load_subconfig`), so the Hub and every kernel see the same values. No file: no
limits, and the kernel's start-up pays one `stat`.
"""
from __future__ import annotations

import os
import re

from traitlets import Enum, Integer, Unicode, validate
from traitlets.config import Config, Configurable, PyFileConfigLoader

from . import limits_file

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """The limits file cannot be read or holds a bad value; the message names the file."""


def parse_mib(value: object) -> int:
    """`512`, `"512M"`, `"2G"`, `"1.5GiB"` -> MiB (an int is MiB already)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if m is None:
        raise ValueError(f"expected a size like 512M or 2G, got {value!r}")
    number, unit = float(m.group(1)), m.group(2).lower()
    factor = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}[unit]
    return int(number * factor)


class MicroVMLimits(Configurable):
    """Per-user and host-wide limits on microVM kernels. 0 means no limit. Set them as
    `c.MicroVMLimits.<trait>` in /etc/supermachine-kernel/limits.py (docs: deploy/jupyterhub/
    limits.md). A user's kernel cannot raise them: they are not read from Jupyter's config
    path."""

    vms_per_user = Integer(
        0, help="Most VMs one user's kernels may run at once (one per kernel: the VM its cells "
        "run in). A kernel started past it fails with a message naming this setting.",
    ).tag(config=True)
    memory_per_vm = Unicode(
        "0", help="Largest guest RAM one VM may have (e.g. '1G'); a kernel configured with more "
        "(c.MicroVMKernel.memory_mib) fails to start. The VM's size caps what its guest can use.",
    ).tag(config=True)
    memory_per_user = Unicode(
        "0", help="Guest RAM all of one user's VMs may have together (e.g. '4G'), checked at "
        "each kernel start; with cgroups it is also the memory ceiling of the user's cgroup "
        "(QEMU processes and kernel processes included).",
    ).tag(config=True)
    vcpus_per_vm = Integer(
        0, help="Most vCPUs one VM may have (c.MicroVMKernel.vcpus).",
    ).tag(config=True)
    cpu_weight = Integer(
        0, help="The user's CPU share against other users when the CPU is contended: cgroup v2 "
        "cpu.weight (1-10000, 100 = an equal share; cgroup v1 cpu.shares = weight * 1024 / 100). "
        "0 = not set (the cgroup default, 100).",
    ).tag(config=True)
    snapshot_quota = Unicode(
        "0", help="Disk the user's notebook snapshots (%snapshot) may take in total (e.g. '20G'). "
        "A %snapshot that would go past it fails and is removed.",
    ).tag(config=True)
    host_max_vms = Integer(
        0, help="Most VMs all users' kernels may run at once on this host.",
    ).tag(config=True)
    state_dir = Unicode(
        "/run/supermachine-kernel/limits",
        help="Where kernels keep their VM slots (lock files, one per running VM, held by the "
        "kernel process: a killed kernel frees its slot). Must exist and be world-writable "
        "with the sticky bit (mode 1777), like /tmp; the kernel creates it when it can.",
    ).tag(config=True)
    cgroups = Enum(
        ["auto", "v2", "v1", "off"], "auto",
        help="How memory_per_user and cpu_weight are enforced: 'auto' = cgroup v2 if its cpu "
        "and memory controllers are reachable, else cgroup v1; 'off' = not enforced (said in "
        "the kernel's log and %vm).",
    ).tag(config=True)
    cgroup_name = Unicode(
        "supermachine", help="The cgroup under each hierarchy's root that holds one group per "
        "user (user-<uid>).",
    ).tag(config=True)

    @validate("memory_per_vm", "memory_per_user", "snapshot_quota")
    def _check_size(self, proposal: dict) -> str:
        try:
            parse_mib(proposal["value"])
        except ValueError as e:
            raise ConfigError(f"c.MicroVMLimits.{proposal['trait'].name}: {e}") from None
        return str(proposal["value"])

    @validate("cpu_weight")
    def _check_weight(self, proposal: dict) -> int:
        value = int(proposal["value"])
        if value != 0 and not 1 <= value <= 10000:
            raise ConfigError(f"c.MicroVMLimits.cpu_weight must be 1-10000 (or 0), not {value}")
        return value

    @property
    def memory_per_vm_mib(self) -> int:
        return parse_mib(self.memory_per_vm)

    @property
    def memory_per_user_mib(self) -> int:
        return parse_mib(self.memory_per_user)

    @property
    def snapshot_quota_mib(self) -> int:
        return parse_mib(self.snapshot_quota)

    def any_set(self) -> bool:
        """Whether any limit is set (0 everywhere = the file exists but limits nothing)."""
        return any((self.vms_per_user, self.memory_per_vm_mib, self.memory_per_user_mib,
                    self.vcpus_per_vm, self.cpu_weight, self.snapshot_quota_mib,
                    self.host_max_vms))

    def summary(self) -> dict[str, object]:
        """Each limit that is set, by trait name (for logs and %vm)."""
        out: dict[str, object] = {}
        for name in ("vms_per_user", "memory_per_vm", "memory_per_user", "vcpus_per_vm",
                     "cpu_weight", "snapshot_quota", "host_max_vms"):
            value = getattr(self, name)
            if value not in (0, "0"):
                out[name] = value
        return out


def load(path: str | None = None) -> MicroVMLimits | None:
    """The limits in `path` (default: limits_file()), or None when there is no such file.
    A file that exists but cannot be read or run raises ConfigError."""
    path = path or limits_file()
    if not os.path.exists(path):
        return None
    loader = PyFileConfigLoader(os.path.basename(path), os.path.dirname(os.path.abspath(path)))
    try:
        config = loader.load_config()
    except Exception as e:  # noqa: BLE001 - any error inside the admin's file
        raise ConfigError(f"the limits file {path} cannot be loaded: {type(e).__name__}: {e}"
                          ) from None
    try:
        return MicroVMLimits(config=Config({"MicroVMLimits": config.get("MicroVMLimits", {})}))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a TraitError on a wrong type
        raise ConfigError(f"the limits file {path}: {e}") from None
