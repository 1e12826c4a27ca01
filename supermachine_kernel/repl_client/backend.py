"""What `GuestRepl` (client.py) needs from a place to run the guest REPL: the backend interface,
and what the backends share (the guest's environment, reading a ready frame, a spare guest).

A backend launches the REPL driver and hands back a `GuestHandle`: the running process (the
`ExecChild` API of `supermachine_kernel.api`: write_stdin, read_stdout, read_stderr, signal, wait,
...) plus how to release whatever holds it. `VmBackend` (vm.py) runs it in a microVM;
`LocalBackend` (local.py) runs it as a host subprocess for debugging and fast tests and is
NOT isolated.

The guest's environment is built here from an allowlist, never from the kernel's own environment:
the kernel process may hold secrets (JupyterHub's API token, cloud credentials) that must not
reach user code.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from ..prepared import Prepared
from .frames import HEADER, MAX_FRAME_BYTES, RAW_STREAM, ProtocolError, decode_body

GUEST_DRIVER = Path(__file__).resolve().parent.parent / "guest" / "repl.py"

# The whole environment the guest REPL gets, before `guest_env` from the kernel's config.
BASE_GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TERM": "xterm-color",
    "CLICOLOR": "1",
    "FORCE_COLOR": "1",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
}


def guest_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The guest's environment: BASE_GUEST_ENV plus explicitly configured entries only."""
    env = dict(BASE_GUEST_ENV)
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or "=" in key or not key:
            raise ValueError(f"guest_env entries must be str -> str, got {key!r}: {value!r}")
        env[key] = value
    return env


def driver_source() -> bytes:
    return GUEST_DRIVER.read_bytes()


class ExitStatus(Protocol):
    exit_code: int | None
    signal: int | None
    timed_out: bool


class GuestChild(Protocol):
    """The subset of `api.ExecChild` that `GuestRepl` uses."""

    def write_stdin(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def read_stdout(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes: ...
    def read_stderr(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes: ...
    def signal(self, signum: int) -> None: ...
    def wait(self, timeout: float | None = None) -> Any: ...


class GuestHandle(Protocol):
    @property
    def child(self) -> GuestChild:
        """The REPL process."""

    # Optional attributes (read with getattr): `prestarted` — the REPL was started ahead of
    # time and its first "ready" consumed, so `GuestRepl` says hello; `greeted` — that hello
    # was sent already and its "ready" is still unread.

    def release(self) -> None:
        """Stop the REPL and give back what runs it (VM to the pool, process killed)."""

    def describe(self) -> str:
        """Where this guest runs, for messages ("microVM 3 (tcg)", "local process 1234")."""


class Backend(Protocol):
    name: str
    isolated: bool

    def launch(self, driver: bytes, env: dict[str, str]) -> GuestHandle:
        """Start the REPL driver (blocking; called from a worker thread)."""

    def close(self) -> None:
        """Release everything the backend holds (pool, cached image handles)."""


def read_ready_frame(child: GuestChild, timeout: float) -> dict[str, Any]:
    """Reads exactly the REPL's first frame (its "ready") from a freshly started child.

    Used when a backend starts the REPL ahead of time: it consumes the ready frame itself and
    leaves nothing else unread, so whoever attaches later starts on a frame boundary.
    """
    deadline = time.monotonic() + timeout

    def read_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the guest REPL did not start within {timeout:.0f} s")
            chunk = child.read_stdout(n - len(buf), timeout=remaining)
            if not chunk:
                raise EOFError("the guest REPL exited while starting")
            buf += chunk
        return buf

    (size,) = HEADER.unpack(read_exact(HEADER.size))
    if size & RAW_STREAM:
        raise ProtocolError("expected the REPL's ready frame, got stream output first")
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"guest frame of {size} bytes exceeds the limit")
    msg = decode_body(read_exact(size))
    if msg.get("type") != "ready":
        raise ProtocolError(f"expected the REPL's ready frame, got {msg.get('type')!r}")
    return msg


PREIMPORT_ENV = "SUPERMACHINE_REPL_PREIMPORT"


def start_prestarted(spawn: Any, driver: bytes, env: dict[str, str], preimport: list[str],
                     timeout: float) -> Any:
    """Starts a guest REPL via `spawn(driver, env)` with `preimport` modules imported at start,
    consumes its ready frame, and marks the handle prestarted; releases it if it never gets ready."""
    handle = spawn(driver, dict(env, **{PREIMPORT_ENV: ",".join(preimport)}))
    try:
        read_ready_frame(handle.child, timeout=timeout)
    except BaseException:
        handle.release()
        raise
    handle.prestarted = True
    return handle


class SpareKeeper:
    """Keeps one guest started ahead of time: REPL running, modules preimported, ready consumed.

    `take()` hands it out (waiting for it if it is still starting: that is never slower than a
    fresh start) or returns None; `refill()` starts the next one in the background. A spare that
    died while waiting is released and not handed out.
    """

    def __init__(self, start: Callable[[], Any], alive: Callable[[Any], bool]) -> None:
        self._start = start
        self._alive = alive
        self._spare: Prepared | None = None
        self._lock = threading.Lock()
        self._closed = False

    def refill(self) -> None:
        with self._lock:
            if self._closed or self._spare is not None:
                return
            self._spare = Prepared(self._start, _release_handle, name="guest-spare")

    def take(self) -> Any:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        handle = spare.claim()  # None if it failed to start: the caller starts one the normal way
        if handle is None:
            return None
        if not self._alive(handle):
            handle.release()
            return None
        return handle

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.release()


def _release_handle(handle: Any) -> None:
    handle.release()
