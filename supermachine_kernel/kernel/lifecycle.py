"""The kernel's guest from its start to the process's exit: start-up, shutdown and restart,
SIGTERM, and the exit itself, in that order.

- Start (`make_guest`, `start_guest`): the request start-up read but did not answer is
  dispatched first; the VM start-up restored ahead (supermachine_kernel/startup) goes to the
  backend if it is the one the configuration names; the guest REPL client starts the guest in
  the background.
- shutdown_request, with or without restart (`shutdown_guest`, from the kernel's do_shutdown):
  the guest is released. A restart is a new kernel process (jupyter_client relaunches it),
  which restores the warm snapshot.
- The process ends (an exit function, SIGTERM: `release_now`): no VM may outlive it. The
  kernel's VM is released; a VM still being restored ahead for %restore is not waited for
  (Jupyter SIGKILLs a kernel 5 s after asking it to stop): it dies with the process, and
  `remove_work_dirs` removes what every VM left (the runtime's per-VM work dirs).
- `exit_process`: the application's last step. No interpreter finalization: daemon threads may
  sit inside the VM runtime's blocking calls, and unwinding them at finalization aborts.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import signal
import sys
import threading
import typing as t

import zmq
from ipykernel.kernelbase import Kernel

from ..machine.restore_ahead import forget_all
from ..repl_client import GuestRepl, guest_environment


def dispatch_early_requests(kernel: Kernel, startup: t.Any) -> None:
    """The request the start-up responder read but did not answer (startup/responder.py):
    handed to the shell handlers before anything the socket delivers from now on."""
    stash = startup.early_stash if startup is not None else []
    for frames in stash:
        msg = [zmq.Frame(f) for f in frames]
        if kernel.shell_channel_thread:
            kernel.shell_channel_thread.io_loop.add_callback(kernel.shell_channel_thread_main, msg)
        else:
            kernel.io_loop.add_callback(kernel.shell_main, None, msg)


def within_limits(backend: t.Any, config: t.Any, startup: t.Any) -> t.Any:
    """The VM backend under the host's limits (supermachine_kernel/limits), when the admin
    set any: its launches take this kernel's VM slot and cgroup first."""
    from .. import limits  # noqa: PLC0415 - imports nothing; kernel.py only on limited hosts

    if getattr(backend, "name", "") != "vm" or not limits.active():
        return backend
    from ..limits.kernel import gate  # noqa: PLC0415

    return gate(backend, config.memory_mib, config.vcpus, startup)


def make_guest(backend: t.Any, startup: t.Any, on_event: t.Callable[[str, dict, list], None],
               env: dict, startup_timeout: float) -> GuestRepl:
    """The guest REPL client on the current loop; a VM start-up restored ahead goes to the
    backend if the configuration names its snapshot, and is released otherwise."""
    early_vm = startup.take_vm() if startup is not None else None
    if early_vm is not None:
        if hasattr(backend, "early"):
            backend.early = early_vm
        else:
            early_vm.release()
    return GuestRepl(backend, asyncio.get_event_loop(), on_event,
                     env=guest_environment(dict(env)), startup_timeout=startup_timeout)


def start_guest(guest: GuestRepl,
                on_started: t.Callable[[concurrent.futures.Future], None] | None = None) -> None:
    """The first guest starts in the background, and is released when the process ends.
    `on_started(future)` runs once that start ended (on the thread that ended it)."""
    started = guest.start()
    if on_started is not None:
        started.add_done_callback(on_started)
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit_on_sigterm(guest))
    atexit.register(release_now, guest)


async def shutdown_guest(guest: GuestRepl | None, log: t.Any) -> None:
    """shutdown_request (and restart): release the guest, on its loop (the request comes on
    the control thread)."""
    if guest is None:
        return
    try:
        coro = guest.shutdown()
        if asyncio.get_running_loop() is guest.loop:
            await coro
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, guest.loop))
    except Exception:  # noqa: BLE001
        log.exception("releasing the guest failed")


def release_now(guest: GuestRepl) -> None:
    """The process is ending: the guest goes now (a VM start-up restored is the backend's by
    then, and released with it)."""
    guest.close_now()


def remove_work_dirs() -> None:
    """The last step before os._exit: the runtime removes the work dirs of the VMs this
    process still has (their QEMUs die with it) and starts no new one. Nothing to do when the
    runtime was never loaded (the local backend)."""
    core = sys.modules.get("supermachine_kernel._core")
    if core is not None:
        core.remove_work_dirs_at_exit()


def _exit_on_sigterm(guest: GuestRepl) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        release_now(guest)
        forget_all()  # the VMs restored ahead for %restore (no exit functions run here)
        remove_work_dirs()
    finally:
        os._exit(0)


def exit_process(control_thread: threading.Thread | None, shutdown_requested: bool) -> t.NoReturn:
    """The application's exit, once its loop stopped: exit functions (ipykernel's close,
    `release_now`), then os._exit.

    After a shutdown_request the control thread still flushes stdio through the IOPub thread
    and publishes its idle status before it stops; ipykernel's close() stops the IOPub thread
    first and then joins the control thread, which would wait on a flush nobody serves. So the
    control thread finishes first (at most 2 s)."""
    if control_thread is not None and shutdown_requested and control_thread.is_alive():
        control_thread.join(2.0)
    atexit._run_exitfuncs()
    # The API module registers this as an exit function too, but exit functions registered
    # before that module was imported run after it: called again here, last.
    remove_work_dirs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
