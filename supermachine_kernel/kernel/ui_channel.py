"""The UI channel: the comm target ``supermachine.vm`` that the JupyterLab / Notebook 7 extension
(labextension/) opens. It is answered in the kernel process and never reaches the guest
(kernel/comms.py routes it here).

What it owns: the state the extension shows (the VM's accelerator, memory, start time and where
it came from; this notebook's snapshot tree and the current position in it; the %pool figures)
and the extension's actions on snapshots. Every action runs the magic a user would type
(magics/snapshot.py, magics/restore.py), with that magic's text as the answer, so a UI action
leaves the same store entries, kernel log lines and messages as the magic does.

Messages, frontend → kernel (comm_msg ``data``; ``id`` is echoed in the answer):

    {"request": "refresh"}                                      state now (even if unchanged)
    {"request": "snapshot", "id": I, "name": N or null}         %snapshot [N]
    {"request": "restore",  "id": I, "ref": R}                  %restore R
    {"request": "delete",   "id": I, "ref": R}                  %snapshot --delete R
    {"request": "rename",   "id": I, "ref": R, "new_name": N}   %snapshot --rename R N

kernel → frontend:

    {"type": "state", "state": {...}}       on open, and whenever a figure changed (`ui_state`)
    {"type": "result", "id": I, "request": ..., "ok": bool, "output": text,
     "error": {"ename", "evalue", "hint"} or null}

Traffic: a poll on the kernel's loop looks at host-side facts every POLL_INTERVAL seconds and
sends only when something changed. It shows the VM's start time, never a ticking uptime (the
browser counts), and reads the guest's memory only after a cell or an action ran, so an idle
kernel sends nothing and stays idle for culling. A frontend message that is not one of the
above gets a result with ok false; nothing it sends reaches a shell or a path unchecked (names
go through the magics' own argument parsing and the store's name checks).
"""
from __future__ import annotations

import asyncio
import logging
import shlex
import typing as t

from ..machine import process_start_time
from ..magics import Context, HostMagics
from ..magics.pool import pool_stats

log = logging.getLogger("supermachine_kernel.kernel.ui_channel")

TARGET_NAME = "supermachine.vm"
PROTOCOL_VERSION = 1
POLL_INTERVAL = 2.0  # seconds between looks at the host-side facts
MAX_FIELD = 200  # characters of a name or ref the frontend may send
MEMINFO_MAX_BYTES = 64 << 10  # the guest's /proc/meminfo is ~1.5 KiB; a hostile one gets cut
MEMINFO_TIMEOUT = 5.0  # seconds; a guest that does not answer leaves the figure out
REQUESTS = ("refresh", "snapshot", "restore", "delete", "rename")
# %pool figures that tick on their own: the browser computes uptime from the start time.
_TICKING = ("vm_uptime_s",)


class UiRequestError(Exception):
    """A frontend message the channel cannot act on (the message says why)."""


def _field(data: dict, key: str, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise UiRequestError(f"{key!r} must be a non-empty string of at most {MAX_FIELD} "
                             "characters")
    return value


def magic_line(data: dict) -> tuple[str, str]:
    """The magic (name, argument string) a request stands for; UiRequestError if malformed."""
    request = data.get("request")
    if request == "snapshot":
        name = _field(data, "name", required=False)
        return "snapshot", shlex.quote(name) if name else ""
    if request == "restore":
        return "restore", shlex.quote(t.cast(str, _field(data, "ref")))
    if request == "delete":
        return "snapshot", "--delete " + shlex.quote(t.cast(str, _field(data, "ref")))
    if request == "rename":
        ref, new = _field(data, "ref"), _field(data, "new_name")
        return "snapshot", f"--rename {shlex.quote(t.cast(str, ref))} {shlex.quote(t.cast(str, new))}"
    raise UiRequestError(f"unknown request {request!r}; expected one of {', '.join(REQUESTS)}")


class _Captured(Context):
    """A magic's context whose output is collected for the answer instead of going to IOPub."""

    def __init__(self, host: HostMagics) -> None:
        super().__init__(host, silent=False)
        self.parts: list[str] = []

    def publish(self, msg_type: str, content: dict, **kw: t.Any) -> None:
        if msg_type == "stream":
            self.parts.append(str(content.get("text", "")))
        elif msg_type in ("display_data", "execute_result"):
            self.parts.append(str((content.get("data") or {}).get("text/plain", "")))

    @property
    def output(self) -> str:
        return "".join(self.parts).strip()


def ui_state(machine: t.Any, execution_count: int, guest_memory: dict | None,
             clean_count: int | None) -> dict:
    """Everything the extension shows, as plain JSON values. Host-side reads only (the store,
    /proc, the pool); ``guest_memory`` is the last reading taken by the channel."""
    snaps = machine.snapshots
    entries = snaps.entries()
    pool = {k: v for k, v in pool_stats(machine).items() if k not in _TICKING}
    vm: dict[str, t.Any] = {"running": False}
    try:
        handle = machine.handle()
        v = handle.vm
        since, how = machine.vm_origin(v)
        vm = {
            "running": True,
            "id": getattr(v, "id", None),
            "accelerator": getattr(v, "accel", None),
            # A restored VM counts from its restore (a restored-ahead one sat paused before).
            "started": since if since is not None else process_start_time(getattr(v, "qemu_pid", None)),
            "origin": how,
            "origin_time": since,
            "restored": since is not None,
        }
    except Exception:  # noqa: BLE001 - no VM right now (starting, died, local backend)
        pass
    vm.update(guest_memory or {})
    return {
        "protocol": PROTOCOL_VERSION,
        "group": {"key": snaps.key, "label": snaps.label},
        "head": machine.head,
        "dirty": clean_count is None or execution_count != clean_count,
        "execution_count": execution_count,
        "snapshots": [{
            "name": e.name, "ref": e.ref, "created": e.created, "size_bytes": e.size_bytes,
            "parent": e.parent, "execution_count": e.execution_count, "took_s": e.took_s,
        } for e in entries],
        "vm": vm,
        "pool": pool,
    }


def guest_memory(machine: t.Any) -> dict:
    """{"memory_total_bytes", "memory_used_bytes"} from the guest's /proc/meminfo (one agent
    call, size- and time-bounded), or {} when the VM cannot be asked. Blocking: run it on a
    worker thread."""
    try:
        vm = machine.handle().vm
        if "read_limits" not in (getattr(vm, "agent_features", None) or []):
            return {}  # an agent that cannot bound the read: the guest could send any size
        text = vm.read_file("/proc/meminfo", max_bytes=MEMINFO_MAX_BYTES,
                            timeout=MEMINFO_TIMEOUT).decode()
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        available = int(info["MemAvailable"].split()[0]) * 1024
    except Exception as e:  # noqa: BLE001 - starting, died, suspended, a guest that lies
        log.debug("guest memory not read: %s: %s", type(e).__name__, e)
        return {}
    if not 0 <= available <= total:
        return {}
    # MiB granularity: page-cache noise below that would be a message per look.
    mib = 1 << 20
    return {"memory_total_bytes": total // mib * mib,
            "memory_used_bytes": (total - available) // mib * mib}


class UiChannel:
    """One per kernel: the open ``supermachine.vm`` comms, the state last sent and the poll."""

    def __init__(self, kernel: t.Any, publish: t.Callable[..., None]) -> None:
        self._kernel = kernel
        self._publish = publish  # IopubRelay.publish: runs on the shell loop
        self.comms: dict[str, dict] = {}  # comm id -> the comm_open's parent
        self._last: dict | None = None
        self._memory: dict | None = None
        self._memory_key: tuple | None = None  # (vm id, execution count) of that reading
        # ((head, its creation time, VM id), execution count) when that position was reached
        self._clean: tuple[tuple, int] | None = None
        self._poll: asyncio.Task | None = None

    # -- routing (kernel/comms.py) -------------------------------------------------------------

    def owns(self, comm_id: t.Any) -> bool:
        return isinstance(comm_id, str) and comm_id in self.comms

    def comm_info(self, target_name: str | None) -> dict:
        if target_name not in (None, TARGET_NAME):
            return {}
        return {cid: {"target_name": TARGET_NAME} for cid in self.comms}

    async def handle(self, kind: str, content: dict, parent: dict) -> None:
        """comm_open (target ``supermachine.vm``), comm_msg or comm_close from the frontend."""
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str):
            return
        if kind == "comm_open":
            self.comms[comm_id] = parent
            await self._send_state(force=True, only=comm_id)
            if self._poll is None or self._poll.done():
                self._poll = asyncio.get_running_loop().create_task(self._poll_loop())
            return
        if kind == "comm_close":
            self.comms.pop(comm_id, None)
            if not self.comms and self._poll is not None:
                self._poll.cancel()
                self._poll = None
            return
        data = content.get("data")
        await self._on_message(comm_id, data if isinstance(data, dict) else {}, parent)

    # -- requests ------------------------------------------------------------------------------

    async def _on_message(self, comm_id: str, data: dict, parent: dict) -> None:
        request = data.get("request")
        rid = data.get("id") if isinstance(data.get("id"), (str, int)) else None
        if request == "refresh":
            await self._send_state(force=True, only=comm_id)
            return
        answer: dict[str, t.Any] = {"type": "result", "id": rid, "request": str(request)[:50],
                                    "ok": False, "output": "", "error": None}
        try:
            name, args = magic_line(data)
        except UiRequestError as e:
            answer["error"] = {"ename": "UiRequestError", "evalue": str(e), "hint": ""}
            self._send(comm_id, answer, parent)
            return
        host = self._host()
        ctx = _Captured(host)
        self._kernel.log.info("UI request: %%%s %s", name, args)
        try:
            await host.registry.magics[name](ctx, args)
            answer["ok"] = True
        except Exception as e:  # noqa: BLE001 - every failure is an answer, as in a cell
            hint = getattr(e, "hint", "")
            ename = getattr(e, "ename", None) or type(e).__name__
            if not hasattr(e, "hint"):
                log.exception("UI request %s failed", request)
            answer["error"] = {"ename": ename, "evalue": str(e), "hint": hint}
        answer["output"] = ctx.output
        self._kernel.log.info("UI request %%%s %s: %s", name, args,
                              ctx.output if answer["ok"] else answer["error"])
        self._memory_key = None  # the VM may have changed: read its memory again
        self._send(comm_id, answer, parent)
        await self._send_state(force=False)

    def _host(self) -> HostMagics:
        host = getattr(self._kernel, "host_magics", None)
        if host is None:
            host = self._kernel.host_magics = HostMagics(self._kernel)
        return host

    # -- state ---------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while self.comms:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self._send_state(force=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad reading must not end the updates
                log.exception("UI state update failed")

    async def _send_state(self, force: bool, only: str | None = None) -> None:
        state = await asyncio.to_thread(self._read_state)
        if not force and state == self._last:
            return
        self._last = state
        for comm_id in ([only] if only else list(self.comms)):
            self._send(comm_id, {"type": "state", "state": state}, self.comms.get(comm_id))

    def _read_state(self) -> dict:
        """Runs on a worker thread: store, /proc and pool reads, and the guest's memory when a
        cell or an action ran since the last reading."""
        machine = self._host().machine()
        count = int(getattr(self._kernel, "execution_count", 0) or 0)
        try:
            vm_id = getattr(machine.handle().vm, "id", None)
        except Exception:  # noqa: BLE001
            vm_id = None
        head_time = next((e.created for e in machine.snapshots.entries()
                          if e.name == machine.head), None)
        position = (machine.head, head_time, vm_id if machine.head is not None else None)
        if self._clean is None or self._clean[0] != position:
            # The position moved (a snapshot taken, a restore: from a cell or from here): the
            # VM's state is saved as of now.
            self._clean = (position, count)
        key = (vm_id, count)
        if vm_id is not None and key != self._memory_key:
            self._memory = guest_memory(machine)
            self._memory_key = key
        clean = self._clean[1] if machine.head is not None else 0
        return ui_state(machine, count, self._memory if vm_id is not None else None, clean)

    def _send(self, comm_id: str, data: dict, parent: dict | None) -> None:
        if comm_id in self.comms:
            self._publish("comm_msg", {"comm_id": comm_id, "data": data}, parent=parent)

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        self.comms.clear()
