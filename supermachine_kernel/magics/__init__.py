"""Host-side line magics: ``%snapshot``, ``%restore``, ``%snapshots``, ``%pool``, ``%vm``,
``%expose``.

They act on the VM itself, so they run in the kernel process and never reach the guest. The
kernel calls `dispatch` at the start of every execute (kernel/microvm.py, do_execute); a cell
whose first lines are our magics runs them here, in order, and the rest of the cell (if any)
goes to the guest as usual. A magic further down a cell is refused with an error that says to
move it: it would otherwise run at the wrong moment.

One file per magic (``magics/<name>.py``) defining ``async def magic(ctx, args)``; its
docstring is the help ``%name?`` shows. A magic that fails to import is reported (logged, and as
a cell error when used) instead of breaking the kernel. A magic raises `MagicError` (or
``MachineError``) for anything the user should see: it becomes the cell's error (ename, evalue,
and a hint in the traceback), and the rest of the cell does not run.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import re
import shlex
from typing import Any, Awaitable, Callable, Optional

from ..kernel.errors import error_content, execute_error_reply
from ..machine import Machine
from .widget import HostWidgets

log = logging.getLogger("supermachine_kernel.magics")

NAMES = ("snapshot", "restore", "snapshots", "pool", "vm", "expose")
LINE_RE = re.compile(r"^%(?P<name>[A-Za-z_]\w*)(?P<help>\?{1,2})?(?:[ \t]+(?P<args>.*?))?\s*$")

MagicFunc = Callable[["Context", str], Awaitable[None]]


class MagicError(Exception):
    """A magic's failure as the user sees it: ``ename: message`` plus a hint."""

    def __init__(self, message: str, hint: str = "", ename: str = "MagicError") -> None:
        super().__init__(message)
        self.hint = hint
        self.ename = ename


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises MagicError instead of printing and exiting."""

    def __init__(self, prog: str, **kw: Any) -> None:
        super().__init__(prog=f"%{prog}", add_help=False, **kw)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MagicError(f"{self.prog}: {message}", f"usage: {self.format_usage().strip()}",
                         ename="UsageError")

    def parse(self, args: str) -> argparse.Namespace:
        try:
            words = shlex.split(args)
        except ValueError as e:
            self.error(str(e))
        return self.parse_args(words)


class Registry:
    """The magics that loaded, and why the others did not."""

    def __init__(self, names: tuple[str, ...] = NAMES) -> None:
        self.names = names
        self.magics: dict[str, MagicFunc] = {}
        self.failed: dict[str, str] = {}
        for name in names:
            try:
                module = importlib.import_module(f"{__name__}.{name}")
                func = getattr(module, "magic")
                if not inspect.iscoroutinefunction(func):
                    raise TypeError(f"{module.__name__}.magic must be an async function")
                self.magics[name] = func
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                self.failed[name] = f"{type(e).__name__}: {e}"
                log.error("magic %%%s failed to load: %s", name, self.failed[name], exc_info=True)

    def __contains__(self, name: str) -> bool:
        return name in self.magics or name in self.failed

    def help(self, name: str) -> str:
        if name in self.failed:
            return f"%{name} failed to load: {self.failed[name]}"
        doc = inspect.getdoc(self.magics[name]) or "(no help)"
        return doc


def split_cell(code: str, known: Callable[[str], bool]) -> tuple[list[re.Match], str]:
    """(our magic lines at the top of the cell, the rest of the cell). Blank and comment lines
    among the leading magics are skipped."""
    lines = code.splitlines(keepends=True)
    found: list[re.Match] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        m = LINE_RE.match(stripped)
        if m is None or not known(m.group("name")):
            break
        found.append(m)
        i += 1
    rest = "".join(lines[i:]) if found else code
    return found, rest


class Context:
    """What a magic works with: the kernel, its Machine, output, host widgets."""

    def __init__(self, host: "HostMagics", silent: bool) -> None:
        self.host = host
        self.kernel = host.kernel
        self.silent = silent
        self.parent = host.kernel.iopub.cell_parent

    @property
    def machine(self) -> Machine:
        return self.host.machine()

    @property
    def widgets(self) -> HostWidgets:
        return self.kernel.comms.host_widgets()

    def publish(self, msg_type: str, content: dict, **kw: Any) -> None:
        if not self.silent:
            self.kernel.iopub.publish(msg_type, content, **kw)

    def print(self, text: str, stream: str = "stdout") -> None:
        if not text.endswith("\n"):
            text += "\n"
        self.publish("stream", {"name": stream, "text": text})

    def display(self, data: dict, metadata: Optional[dict] = None) -> None:
        self.publish("display_data", {"data": data, "metadata": metadata or {}, "transient": {}})


class HostMagics:
    """One per kernel: the registry, and the Machine, created on first use. The host widgets
    are the kernel's comm router's (kernel/comms.py), which routes their comm messages."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.registry = Registry()
        self._machine: Optional[Machine] = None
        #: %expose's exposures (magics/expose.py), created on first use.
        self.exposures: Any = None

    def machine(self) -> Machine:
        if self._machine is None:
            self._machine = Machine(self.kernel)
        return self._machine

    async def run_cell(self, code: str, silent: bool) -> tuple[str, Optional[dict]]:
        found, rest = split_cell(code, self.registry.__contains__)
        if not found:
            stray = [m for m in (LINE_RE.match(ln.strip()) for ln in code.splitlines()) if m
                     and m.group("name") in self.registry]
            if not stray:
                return code, None
        ctx = Context(self, silent)
        try:
            for m in found:
                name, args = m.group("name"), m.group("args") or ""
                if m.group("help"):
                    return rest, _ok([{"source": "page", "start": 0,
                                       "data": {"text/plain": self.registry.help(name)}}])
                if name in self.registry.failed:
                    raise MagicError(f"%{name} is not available: it failed to load "
                                     f"({self.registry.failed[name]})",
                                     "See the kernel log for the traceback.", ename="MagicLoadError")
                await self.registry.magics[name](ctx, args)
            misplaced = [m.group(0) for m in (LINE_RE.match(ln.strip()) for ln in rest.splitlines())
                         if m and m.group("name") in self.registry]
            if misplaced:
                raise MagicError(
                    f"{misplaced[0]!r} must come first in its cell: host magics run before the "
                    "cell's code reaches the VM", "Move it to the top of the cell, or to a cell "
                    "of its own.", ename="UsageError")
        except Exception as e:  # noqa: BLE001 - every failure is a cell error
            return rest, self._error(ctx, e)
        if rest.strip():
            return rest, None
        return rest, _ok()

    def _error(self, ctx: Context, e: Exception) -> dict:
        hint = getattr(e, "hint", "")
        ename = getattr(e, "ename", None) if hasattr(e, "hint") else None
        if ename is None:
            ename = type(e).__name__
            log.exception("host magic failed")
        content = error_content(ename, str(e), [hint] if hint else [])
        ctx.publish("error", content)
        return execute_error_reply(content)


def _ok(payload: Optional[list] = None) -> dict:
    return {"status": "ok", "user_expressions": {}, "payload": payload or []}


async def dispatch(kernel: Any, code: str, silent: bool = False) -> tuple[str, Optional[dict]]:
    """The kernel's hook: returns (code for the guest, None) or (…, the execute reply) when the
    cell was handled (entirely, or it failed) on the host. Cheap for cells without ``%``."""
    if "%" not in code:
        return code, None
    try:
        host = kernel.host_magics
        if host is None:
            host = kernel.host_magics = HostMagics(kernel)
        return await host.run_cell(code, silent)
    except Exception as e:  # noqa: BLE001 - a bug here must not take the cell (or kernel) down
        log.exception("host magics failed")
        content = error_content("MagicError", f"host magics failed: {type(e).__name__}: {e}", [
            "This is a bug in supermachine_kernel.magics; see the kernel log."])
        if not silent:
            kernel.iopub.publish("error", content)
        return code, execute_error_reply(content)
