"""Local backend: the guest REPL as a plain host subprocess. NOT ISOLATED — debugging and tests only.

`LocalChild` mirrors the `api.ExecChild` API over `subprocess.Popen`, so `GuestRepl` cannot tell
the difference; that is what lets the kernel's tests run without QEMU. The child gets the same
allowlisted environment a VM would (never the kernel's), its own temporary HOME/cwd, and its own
session (so a SIGINT sent to the kernel's process group does not reach it directly: interrupts are
forwarded by the kernel, as they must be for a VM).
"""
from __future__ import annotations

import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

from .backend import SpareKeeper, start_prestarted


@dataclass
class LocalExit:
    exit_code: int | None
    signal: int | None
    timed_out: bool = False
    peak_rss_kib: int | None = None


class LocalChild:
    """`ExecChild` over a host subprocess (pipes, no pty)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            bufsize=0,
            start_new_session=True,
            close_fds=True,
        )
        self.id = self._proc.pid
        self.os_pid = self._proc.pid

    def write_stdin(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        view = memoryview(data)
        while view:
            n = os.write(self._proc.stdin.fileno(), view)
            view = view[n:]

    def close_stdin(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()

    def _read(self, stream: IO[bytes] | None, max_bytes: int, timeout: float | None) -> bytes:
        assert stream is not None
        fd = stream.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:  # select returns nothing only when it timed out
            raise TimeoutError(f"no output within {timeout or 0:.3f} s")
        return os.read(fd, max_bytes)

    def read_stdout(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        return self._read(self._proc.stdout, max_bytes, timeout)

    def read_stderr(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        return self._read(self._proc.stderr, max_bytes, timeout)

    def signal(self, signum: int) -> None:
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signum)

    def resize(self, rows: int, cols: int) -> None:  # no pty here
        pass

    def poll(self) -> LocalExit | None:
        if self._proc.poll() is None:
            return None
        return self._status()

    def wait(self, timeout: float | None = None) -> LocalExit:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError("process still running") from None
        return self._status()

    def _status(self) -> LocalExit:
        rc = self._proc.returncode
        return LocalExit(exit_code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None)

    def kill(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class LocalHandle:
    prestarted = False

    def __init__(self, child: LocalChild, workdir: str) -> None:
        self.child = child
        self._workdir = workdir

    def release(self) -> None:
        self.child.kill()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def describe(self) -> str:
        return f"local process {self.child.os_pid} (not isolated)"


class LocalBackend:
    """Runs the REPL driver with a host Python. For debugging and tests: NOT a sandbox."""

    name = "local"
    isolated = False

    def __init__(self, python: str | None = None, spares: int = 1,
                 preimport: list[str] | None = None) -> None:
        self.python = python or sys.executable
        self.python_version = platform.python_version() if self.python == sys.executable else None
        self.preimport = list(preimport or [])
        self._recipe: tuple[bytes, dict[str, str]] | None = None
        self._spares = SpareKeeper(self._start_spare, lambda h: h.child.poll() is None) \
            if spares > 0 else None

    def _spawn(self, driver: bytes, env: dict[str, str]) -> LocalHandle:
        workdir = tempfile.mkdtemp(prefix="smk-local-")
        path = os.path.join(workdir, "repl.py")
        with open(path, "wb") as f:
            f.write(driver)
        env = dict(env, HOME=workdir)
        # The venv's own bin first, so `!pip`/`!python` in cells find the same interpreter.
        env["PATH"] = os.path.dirname(self.python) + os.pathsep + env.get("PATH", "")
        child = LocalChild([self.python, "-u", path], env=env, cwd=workdir)
        return LocalHandle(child, workdir)

    def _start_spare(self) -> LocalHandle:
        assert self._recipe is not None
        driver, env = self._recipe
        return start_prestarted(self._spawn, driver, env, self.preimport, timeout=120)

    def launch(self, driver: bytes, env: dict[str, str]) -> LocalHandle:
        if self._recipe != (driver, env):
            self._recipe = (driver, env)
            spare = None
        else:
            spare = self._spares.take() if self._spares else None
        return spare or self._spawn(driver, env)

    def prepare_spare(self) -> None:
        if self._spares is not None and self._recipe is not None:
            self._spares.refill()

    def close(self) -> None:
        if self._spares is not None:
            self._spares.close()
