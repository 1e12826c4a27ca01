"""The workspace sync around each cell (issue 13): the kernel's working directory (the
notebook's directory under Jupyter Server) kept in step with the guest REPL's cwd.

One `WorkspaceHook` per kernel, mode from `c.MicroVMKernel.workspace` ("off": it sends the
guest nothing at all). The engine is supermachine_kernel/workspace/ (docs/issue13-workspace.md);
this module only connects it to the kernel:

- attach: each new guest REPL (the first, after a restart, a death or a `%restore`: a guest
  handle not seen before) gets a `workspace` request with guest_side.py's source; the REPL makes
  GUEST_ROOT, enters it, watches it (inotify) and answers with its listing and its tree's
  lineage (a token and its execute count). Unless that is the lineage of the last execute sent
  (the same REPL resumed after an idle suspend, or %restore of a snapshot taken since), the
  sync state is forgotten (`WorkspaceSync.forget`): the guest's files are those of a snapshot
  or none, and the next pass compares without state, so nothing on the host is lost (files
  that differ become conflicts: the host's version stays, the guest's is saved beside it).
- before a cell: nothing when neither side changed since the last pass (`unchanged`: an inotify
  read on the host, on the loop); else, on a worker thread, host scan, plan against the REPL's
  last listing, push if not empty (the guest's directories and mtimes through the REPL, file
  bytes through `Vm.upload`); the execute request then says `workspace_clean` so the REPL drops
  the dirty flag of the push's own writes.
- after a cell: only when the REPL put a listing into the execute reply (it does when its
  inotify flag says the workspace changed): plan and pull into the host (mode "sync").
The first attach and push start as soon as the guest is up (`start`), before the first cell.
Every pass's message goes to the cell's stderr, once. The local backend (no VM) has no
workspace sync.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import typing as t

log = logging.getLogger("supermachine_kernel.kernel.workspace")

GUEST_ROOT = "/workspace"
APPLY_TIMEOUT = 120.0   # seconds for the REPL to apply a push's directory and mtime ops
MAX_GUEST_ROOT = 4096

RESTORE_NOTE = ("Workspace: the VM came back with its files of the snapshot's time and was "
                "synced with the notebook's directory, which loses nothing: files only on the "
                "host were copied in; a file that differs keeps the host's version (also in "
                "the VM), and the VM's version is saved beside it on the host as "
                "'NAME (guest copy DATE TIME).ext'.")


OLD_REPL_NOTE = ("The workspace is not synced with this VM: its Python session comes from a "
                 "snapshot taken before the kernel synced workspaces, so its working directory "
                 "is not the notebook's. A restart of the kernel (or a newer snapshot) brings "
                 "the sync back.")


class WorkspaceHook:
    def __init__(self, kernel: t.Any) -> None:
        self.kernel = kernel
        self.mode = kernel.workspace
        self.sync: t.Any = None
        self._handle: t.Any = None          # the guest handle the workspace is attached on
        self._lock = asyncio.Lock()
        self._held: list[str] = []          # messages of a pass no cell was running for
        self._unsupported: t.Any = None     # a guest handle whose REPL has no workspace
        # The guest tree the sync state describes: the REPL's (token, execute count) as of
        # the last execute sent (see guest/repl.py Workspace).
        self._lineage: tuple[str, int] | None = None

    # -- entry points (kernel/microvm.py) --------------------------------------------------------

    def start(self) -> None:
        """Attach and push as soon as the first guest is up (not waiting for a first cell)."""
        if self.mode == "off" or self.kernel.guest is None:
            return
        started = self.kernel.guest.starting_future()
        if started is None:
            return
        loop = self.kernel.guest.loop

        def ready(fut: t.Any) -> None:
            if fut.exception() is None:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._early()))

        started.add_done_callback(ready)

    async def around_cell(self, run: t.Callable[..., t.Awaitable[dict]], silent: bool) -> dict:
        """`run(**extra)` sends the execute request; the sync passes go before and after it."""
        if self.mode == "off":
            reply = await run()
            reply.pop("workspace", None)
            return reply
        async with self._lock:
            extra = await self._before(silent)
        reply = await run(**extra)
        if self._lineage is not None:
            self._lineage = (self._lineage[0], self._lineage[1] + 1)
        listing = reply.pop("workspace", None)
        async with self._lock:
            await self._after(listing, silent)
        return reply

    async def after_restore(self) -> str:
        """%restore put another REPL in place: attach to it now (the state is forgotten unless
        the snapshot holds the very tree it describes) and sync the host into it. What
        %restore says about the workspace ('' when off)."""
        if self.mode == "off" or self._vm() is None:
            return ""
        async with self._lock:
            msg = await self._attached_pass()
        if msg == OLD_REPL_NOTE:
            return msg
        return RESTORE_NOTE + ("\n" + msg if msg else "")

    # -- passes ----------------------------------------------------------------------------------

    async def _early(self) -> None:
        async with self._lock:
            msg = await self._attached_pass()
        if msg:
            self._held.append(msg)

    async def _before(self, silent: bool) -> dict:
        msg = await self._attached_pass()
        if silent:     # a silent execute shows nothing: the next cell says it
            self._held += [msg] if msg else []
        else:
            self._say([*self._held, msg], silent)
            self._held = []
        return {"workspace_clean": True} if self.sync is not None and self.sync.clean else {}

    async def _after(self, listing: t.Any, silent: bool) -> None:
        vm = self._vm()
        if self.mode != "sync" or self.sync is None or vm is None or self._handle is None \
                or self.kernel.guest.handle is not self._handle:
            return
        if listing is None:
            return
        try:
            msg = await asyncio.to_thread(self.sync.after_cell, vm, None, listing)
        except Exception as e:  # noqa: BLE001 - the cell's reply must still go out
            log.exception("workspace sync after a cell failed")
            msg = f"The workspace was not synced after this cell: {e}."
        if silent:
            self._held += [msg] if msg else []
        else:
            self._say([msg], silent)

    async def _attached_pass(self) -> str:
        """Attach to a REPL not seen before, then the host -> guest pass. Its message."""
        guest = self.kernel.guest
        try:
            await guest.wait_ready()
        except Exception:  # noqa: BLE001 - the execute request reports an unavailable guest
            return ""
        vm = self._vm()
        if vm is None:
            return ""
        try:
            t0 = time.monotonic()
            handle = guest.handle
            if handle is self._unsupported:
                return ""
            if handle is not self._handle:
                if not await self._attach(guest, handle):
                    self._unsupported = handle
                    return OLD_REPL_NOTE
            elif self.sync.unchanged():
                return ""           # the usual cell: an inotify read on the host, no thread
            t1 = time.monotonic()
            msg = await asyncio.to_thread(self.sync.before_cell, vm)
            self.kernel.log.info("workspace: host -> VM pass %.3f s (attach %.3f s)",
                                 time.monotonic() - t1, t1 - t0)
            return msg
        except Exception as e:  # noqa: BLE001 - a cell runs even when the sync cannot
            log.exception("workspace sync before a cell failed")
            self._handle = None     # attach again next time
            return f"The workspace was not synced before this cell: {e}."

    async def _attach(self, guest: t.Any, handle: t.Any) -> bool:
        """Attaches the workspace to the REPL of `handle`; False when that REPL has none (it
        comes from a snapshot older than the workspace sync)."""
        from ..workspace.scan import EXTRA_ENTRIES  # noqa: PLC0415 - only with the sync on
        from ..workspace.sync import WorkspaceSync  # noqa: PLC0415
        from ..workspace.transfer import GUEST_SOURCE  # noqa: PLC0415

        if self.sync is None:
            self.sync = WorkspaceSync(os.getcwd(), GUEST_ROOT, self.mode,
                                      self.kernel.workspace_limits(), watch_host=True)
        limits = self.sync.limits
        answer = await guest.request(
            "workspace", op="attach", root=GUEST_ROOT, source=GUEST_SOURCE,
            excludes=list(limits.excludes), hidden=limits.exclude_hidden_dirs,
            max_entries=limits.max_files + EXTRA_ENTRIES, send_back=self.mode == "sync")
        if answer.get("status") != "ok" and "unknown request" in str(answer.get("evalue")):
            return False
        if answer.get("status") != "ok":
            raise RuntimeError(f"the guest REPL could not make its workspace: "
                               f"{answer.get('ename')}: {answer.get('evalue')}")
        root = answer.get("root")
        if not isinstance(root, str) or not root.startswith("/") or "\0" in root \
                or len(root) > MAX_GUEST_ROOT:
            raise RuntimeError("the guest REPL named no usable workspace directory")
        lineage = (answer.get("token"), answer.get("seq"))
        if not (isinstance(lineage[0], str) and isinstance(lineage[1], int)):
            raise RuntimeError("the guest REPL's workspace answer is malformed")
        if lineage != self._lineage:
            # Another tree than the state describes: a fresh guest, or one %restore put back
            # (the same REPL resumed after an idle suspend keeps it). See the module doc.
            self.sync.forget()
        self.sync.guest_root = root
        self.sync.attach(answer.get("listing"), self._applier(guest))
        self._handle, self._lineage = handle, lineage
        return True

    def _applier(self, guest: t.Any) -> t.Callable[[dict], t.Any]:
        """Apply ops (guest_side.py `apply`) run by the REPL, called from a worker thread."""
        from ..workspace.transfer import ListingError  # noqa: PLC0415

        def apply(ops: dict) -> t.Any:
            fut = asyncio.run_coroutine_threadsafe(
                guest.request("workspace", op="apply", ops=ops), guest.loop)
            try:
                answer = fut.result(APPLY_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - GuestDied, a timeout, ...
                fut.cancel()
                raise ListingError(f"the guest REPL did not apply the sync: {e}") from None
            if answer.get("status") != "ok":
                raise ListingError(f"the guest REPL could not apply the sync: "
                                   f"{str(answer.get('evalue'))[:300]}")
            return answer

        return apply

    # ----

    def _vm(self) -> t.Any:
        handle = self.kernel.guest.handle if self.kernel.guest is not None else None
        return getattr(handle, "vm", None)

    def _say(self, messages: list[str], silent: bool) -> None:
        text = "\n".join(m for m in messages if m)
        if text and not silent:
            self.kernel.iopub.publish("stream", {"name": "stderr",
                                                 "text": text.rstrip("\n") + "\n"})
