"""The whole VM, as the magics see it: the kernel's current VM (`Machine`, current.py: its
notebook snapshots taken and restored, the facts %vm and %pool show), restore-ahead (a paused VM
of the likeliest next %restore, restore_ahead.py) and the notebook snapshot store on disk
(snapshot_store.py), and idle suspend (idle.py: an idle kernel's VM snapshotted to disk and
stopped, resumed by the next request). The guest REPL inside the VM is the repl_client's
business."""
from .current import Machine, MachineError, process_rss, process_start_time, process_uptime
from .restore_ahead import RestoreAhead
from .snapshot_store import (
    NotebookSnapshot,
    NotebookSnapshots,
    SnapshotStore,
    StoreError,
    disk_usage,
    format_size,
    kernel_id,
    notebook_key,
    split_ref,
)

__all__ = [
    "Machine",
    "MachineError",
    "NotebookSnapshot",
    "NotebookSnapshots",
    "RestoreAhead",
    "SnapshotStore",
    "StoreError",
    "disk_usage",
    "format_size",
    "kernel_id",
    "notebook_key",
    "process_rss",
    "process_start_time",
    "process_uptime",
    "split_ref",
]
