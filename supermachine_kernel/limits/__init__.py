"""Per-user and host-wide limits an admin sets once (issue 14 part 2).

- config.py: `MicroVMLimits`, the traits, read from /etc/supermachine-kernel/limits.py only.
- accounting.py: VM slots counted across kernel processes (flock'd lock files), the per-VM
  size check and the snapshot quota; `LimitExceeded` says which limit and who raises it.
- cgroup.py: the user's memory ceiling and CPU share as cgroups (v2, v1), or why not.
- kernel.py: what one kernel process does with them: take its slot and join its cgroup before
  its first VM, refuse a launch or a %snapshot past a limit, report for the log and %vm.

This module imports nothing: the kernel's start-up path asks `active()` (one stat) first.
"""
import os

DEFAULT_FILE = "/etc/supermachine-kernel/limits.py"
FILE_ENV = "SUPERMACHINE_LIMITS_FILE"


def limits_file() -> str:
    """The admin's limits file: $SUPERMACHINE_LIMITS_FILE, else /etc/supermachine-kernel/limits.py."""
    return os.environ.get(FILE_ENV) or DEFAULT_FILE


def active() -> bool:
    """Whether this host has a limits file (then kernel.py's steps run)."""
    return os.path.exists(limits_file())
