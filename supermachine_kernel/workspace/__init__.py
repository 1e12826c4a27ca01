"""Workspace sync: the kernel's working directory on the host appears in the guest as the
REPL's cwd, and what a cell writes there comes back (issue 13; docs/issue13-workspace.md).

One job per module:
    scan.py         a snapshot of a tree with the excludes and caps, and what they left out
    plan.py         the copies/deletes/conflicts of one pass, from the last synced state (pure)
    host_writer.py  guest files into the host workspace: openat/O_NOFOLLOW, atomic, no escape
    report.py       the one user-facing message about what was left out or refused
    transfer.py     how bytes move: the guest listing (parsed as hostile input) and the copies
                    through the agent's file API
    guest_side.py   the guest half (stdlib only): list, apply, read, run in the guest's python3;
                    the inotify Watcher; the guest REPL runs the same code in-process
    sync.py         one kernel's sync: the state between cells, before_cell/after_cell, the
                    host tree's watch

The kernel runs it through kernel/workspace_hook.py (and the guest REPL's Workspace in
guest/repl.py); `c.MicroVMKernel.workspace` defaults to "sync".
"""
