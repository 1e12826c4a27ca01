"""Per-user and host-wide limits an admin sets once (issue 14 part 2).

- config.py: `MicroVMLimits`, the traits, read from /etc/supermachine-kernel/limits.py only.
- accounting.py: VM slots counted across kernel processes (flock'd lock files), the per-VM
  size check and the snapshot quota; `LimitExceeded` says which limit and who raises it.
"""
from .accounting import Ledger, LimitExceeded, Slot, check_snapshot_quota, check_vm_size
from .config import ConfigError, MicroVMLimits, load

__all__ = ["ConfigError", "Ledger", "LimitExceeded", "MicroVMLimits", "Slot",
           "check_snapshot_quota", "check_vm_size", "load"]
