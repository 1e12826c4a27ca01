"""%restore: replace the running microVM with a snapshot (this notebook's, or another's by GROUP/NAME)."""
from __future__ import annotations

import time

from ..machine import StoreError, format_size
from . import ArgumentParser, Context, MagicError

_parser = ArgumentParser("restore")
_parser.add_argument("name", nargs="?")


async def magic(ctx: Context, args: str) -> None:
    """Go back to a snapshot of this notebook: the running microVM is replaced by the one in the
    snapshot, and the kernel carries on with its state — variables, files written in the guest,
    background threads and processes, exactly as they were when ``%snapshot`` ran.

        %restore              the latest snapshot
        %restore NAME         snapshot NAME (see %snapshots)
        %restore GROUP/NAME   snapshot NAME of another notebook or kernel (see %snapshots --all)
        %restore GROUP/       that group's latest snapshot

    The execution count keeps counting. The restored guest's clock is set to now and its random
    number generators (the kernel's and Python's ``random``) are reseeded, so two restores of one
    snapshot never share random numbers. The snapshot just taken or restored is restored ahead
    in the background and kept paused (one idle VM; SUPERMACHINE_RESTORE_AHEAD=0 turns it off),
    so going back to it takes a few tens of milliseconds; its files are checked unchanged before
    it is used. Works from a later kernel session of the same notebook, and after a restart of
    the kernel; a plain NAME never reaches another notebook's snapshots. A damaged snapshot is
    refused with the reason (its files are checksummed).

    Workspace files (c.MicroVMKernel.workspace "sync" or "read-only"): the guest's copy comes
    back as it was in the snapshot and is synced with the notebook's directory at once, so
    nothing on the host is lost: files only on the host are copied in, and where both differ
    the host's version stays (and goes into the VM) while the VM's is saved beside it as
    "NAME (guest copy DATE TIME).ext".
    """
    opts = _parser.parse(args)
    machine = ctx.machine
    try:
        group, entry = machine.store.resolve(machine.snapshots, opts.name)
    except StoreError as e:
        raise MagicError(str(e), "List this notebook's snapshots with %snapshots, every "
                         "notebook's with %snapshots --all.", ename="SnapshotNotFound") from e
    took = await machine.restore(entry)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
    # The count is that of the %snapshot cell itself: the state is the one it ran in.
    cell = f" at cell [{entry.execution_count}]" if entry.execution_count else ""
    source = f"; from {group.label}" if group.foreign else ""
    ahead = " (its VM was restored ahead, in the background)" if machine.last_restore_was_ahead else ""
    ctx.print(f"Restored snapshot {entry.ref!r} (taken {when}{cell}{source}; "
              f"{format_size(entry.size_bytes)}) in {took:.2f} s{ahead}.")
    workspace = await ctx.kernel.workspace_sync.after_restore()  # kernel/workspace_hook.py
    if workspace:
        ctx.print(workspace)
