"""The start-up sequence (`Startup`): the kernel process's first ~300 ms, while ipykernel is
being imported, put to use.

When an earlier kernel with the same command line left a launch hint (hint.py), the process,
before ipykernel's imports:

- restores the hinted warm snapshot on a thread and re-attaches to its REPL, which warms
  itself up in the guest while ipykernel loads (the agent signals it after the restore's
  Hello: guest/repl.py, install_hello_notification) (`EarlyVm`, started by `Startup.begin`).
  The VM backend takes that VM only if its own configuration resolves to the same snapshot,
  and releases it otherwise;
- once the shell and iopub sockets are bound (sockets.py), `Startup.answer` starts the early
  responder (responder.py), which answers the frontend's first request if it is
  kernel_info_request, from the hint, and welcomes iopub subscribers; `stop_responder()` ends
  it before the kernel takes the sockets over.

SUPERMACHINE_EARLY_START=0 turns both off.
"""
from __future__ import annotations

import atexit
import os
import sys

from .. import __version__, env_switch
from ..prepared import Prepared
from . import hint as launch_hint

# Only built-in modules are imported above. Everything else is imported where it is needed,
# for start-up speed, not to dodge an import cycle: this module runs first in the kernel
# process, and the VM restore it starts is on the path of the first cell (`logging` and
# `typing` take ~8 ms each to import; mypy reads TYPE_CHECKING as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

    from .responder import EarlyResponder

EARLY_SWITCH_INTERVAL = 0.0005  # seconds; sys.getswitchinterval() while the early threads run


def _log() -> Any:
    import logging  # noqa: PLC0415 - start-up speed (see the imports above)

    return logging.getLogger("supermachine_kernel.startup.sequence")


def enabled(env: dict[str, str]) -> bool:
    return env_switch(env, "SUPERMACHINE_EARLY_START")


def cache_dir() -> str:
    """Where hints live: beside the image cache (the compiled runtime knows where that is)."""
    try:
        # The runtime directly: the API takes ~25 ms more to import, on the start-up path.
        from .. import _core  # noqa: PLC0415 - may be absent (local backend only)

        return _core.image_cache_dir(None)
    except Exception:  # noqa: BLE001 - no runtime (local backend only): the XDG default
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "supermachine-kernel")


# -- the VM restored ahead --------------------------------------------------------------------


class EarlyVm:
    """Restores the image's warm snapshot (the hint's) and greets its REPL on a thread;
    `take()` hands (vm, child) over."""

    def __init__(self, warm_snapshot: str) -> None:
        self.warm_snapshot = warm_snapshot
        self._prepared = Prepared(self._restore, _release_vm, name="early-vm")

    def _restore(self) -> tuple[Any, Any]:
        try:
            from .. import limits  # noqa: PLC0415 - imports nothing (start-up speed)

            if limits.active():  # the VM's slot and cgroup before its QEMU starts
                from ..limits.kernel import enter_for_snapshot  # noqa: PLC0415

                enter_for_snapshot(self.warm_snapshot)
            return restore_and_attach(self.warm_snapshot)
        except BaseException as e:  # the backend's normal path runs instead
            _log().info("early restore of %s failed: %s", self.warm_snapshot, e)
            raise

    @property
    def error(self) -> Optional[BaseException]:
        return self._prepared.error

    def take(self, warm_snapshot: Optional[str],
             timeout: float = 60.0) -> Optional[tuple[Any, Any]]:
        """(vm, REPL child) if it was restored from `warm_snapshot` (the backend's) and is
        alive; else None (and the VM is released)."""
        mine = os.path.realpath(self.warm_snapshot)
        if warm_snapshot is None or os.path.realpath(warm_snapshot) != mine:
            self.release()
            return None
        taken = self._prepared.claim(timeout)
        if taken is None:
            return None
        vm, child = taken
        if not getattr(vm, "alive", True):
            vm.release()
            return None
        # Here, not at the top: this module is on the start-up path, take() is not.
        from .. import api  # noqa: PLC0415 - start-up speed (see the imports above)

        return api.Vm(vm), child

    def release(self) -> None:
        self._prepared.release()


def _release_vm(restored: tuple[Any, Any]) -> None:
    restored[0].release()


def restore_and_attach(warm_snapshot: str) -> tuple[Any, Any]:
    """Restores the warm snapshot, re-attaches to the REPL it holds and says hello to it
    (repl_client/attach.py). The REPL's "ready" answer waits unread in the runtime until the
    kernel's `GuestRepl` adopts the VM (the handle is marked `greeted`): answering takes the
    REPL ~80 ms right after a restore under TCG, and this way it is done while ipykernel is
    imported, not after. Blocking. Returns the runtime's own VM object (`take` wraps it in
    `api.Vm`) and the REPL's process handle."""
    # The runtime directly, deliberately: it verifies the snapshot and restores with the GIL
    # released, while importing the Python API here would hold the GIL the main thread's
    # imports need.
    from .. import _core  # noqa: PLC0415 - imported already (cache_dir)

    vm = _core.Vm.restore(warm_snapshot, timeout=60.0)
    try:
        # Imported only now, for start-up speed (not to dodge a cycle): the restore above is
        # what the kernel waits for; prepare_attach imports it meanwhile.
        from ..repl_client.attach import attach_repl  # noqa: PLC0415

        child = attach_repl(vm, greet=True)
    except BaseException:
        vm.release()
        raise
    return vm, child


# -- the facade the kernel uses ---------------------------------------------------------------


class Startup:
    def __init__(self, key: str, hint: Optional[dict]) -> None:
        self.key = key
        self.hint = hint
        self.responder: Optional[EarlyResponder] = None
        self.vm: Optional[EarlyVm] = None
        self.sockets: Any = None  # the early-bound shell and iopub sockets (sockets.py), if any
        self.early_stash: list[list[bytes]] = []  # the requests the responder kept (stop_responder)
        self._switch_interval: Optional[float] = None
        if hint is not None:
            # The main thread is busy importing ipykernel for the next ~250 ms; with the default
            # 5 ms GIL switch interval the responder waited ~100 ms to send one reply.
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(EARLY_SWITCH_INTERVAL)
            if hint.get("snapshot"):
                self.vm = EarlyVm(hint["snapshot"])
                atexit.register(self.vm.release)

    @classmethod
    def begin(cls, argv: list[str]) -> "Startup":
        """Reads this command line's hint and starts restoring its VM at once; always returns
        a Startup (its key is where this kernel writes its own hint)."""
        env = dict(os.environ)
        key = launch_hint.hint_key(argv, env, __version__)
        hint = launch_hint.read(cache_dir(), key) if enabled(env) else None
        return cls(key, hint)

    def answer(self, sockets: Any) -> None:
        """Starts answering on the early-bound sockets (see the module doc), if there is a hint
        and the connection file's key is usable."""
        self.sockets = sockets
        if self.hint is not None and sockets is not None and sockets.key is not None:
            from .responder import EarlyResponder  # noqa: PLC0415 - start-up speed, see above

            self.responder = EarlyResponder(sockets.shell, sockets.iopub, sockets.key,
                                            sockets.signature_scheme, self.hint["kernel_info"])

    def prepare_attach(self) -> None:
        """Imports what restore_and_attach and the VM backend that takes its VM need (~40 ms
        of modules, the kernel's anyway) now, while the restore runs with the GIL released,
        instead of after it, on the path of the first cell. Called once the sockets are bound
        and answered."""
        if self.vm is not None:
            from ..repl_client import attach, vm  # noqa: F401, PLC0415 - start-up speed, see above

    def stop_responder(self) -> list[list[bytes]]:
        """Ends the responder (if any); returns the requests it kept for the kernel.
        The imports are over by now: the GIL switch interval goes back to what it was."""
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        responder = self.responder
        self.early_stash = responder.stop() if responder is not None else []
        return self.early_stash

    @property
    def answered_kernel_info(self) -> bool:
        return self.responder is not None and self.responder.answered

    def take_vm(self) -> Optional[EarlyVm]:
        vm, self.vm = self.vm, None
        return vm

    def save_hint(self, kernel_info: dict, warm_snapshot: Optional[str]) -> None:
        try:
            launch_hint.write(cache_dir(), self.key, kernel_info, warm_snapshot)
        except OSError as e:
            _log().info("cannot write the launch hint: %s", e)
