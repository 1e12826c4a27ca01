"""What the session needs from a place to run the guest REPL: the backend interface.

A backend launches the REPL driver and hands back a `GuestHandle`: the running process (the
`ExecChild` API of `supermachine_kernel.api`: write_stdin, read_stdout, read_stderr, signal, wait,
...) plus how to release whatever holds it. `VmBackend` (session/vm.py) runs it in a microVM;
`LocalBackend` (session/local.py) runs it as a host subprocess for debugging and fast tests and is
NOT isolated.

The guest's environment is built here from an allowlist, never from the kernel's own environment:
the kernel process may hold secrets (JupyterHub's API token, cloud credentials) that must not
reach user code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

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
    """The subset of `api.ExecChild` the session uses."""

    def write_stdin(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def read_stdout(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes: ...
    def read_stderr(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes: ...
    def signal(self, signum: int) -> None: ...
    def wait(self, timeout: float | None = None) -> Any: ...


class GuestHandle(Protocol):
    child: GuestChild

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
