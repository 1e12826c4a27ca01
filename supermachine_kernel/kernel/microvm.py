"""MicroVMKernel: the "Python (microVM)" Jupyter kernel. Every cell runs in the guest REPL.

The class holds ipykernel's `do_*` hooks and the few base-class handlers a proxy kernel must
override (kernel_info without a debugger, comm forwarding, an interrupt that reaches the guest,
one shell request at a time). Each delegates to the part that does the work, and every guest
call goes through one `GuestRepl` (repl_client/client.py): iopub.py relays guest output,
stdin.py the guest's input(), comms.py routes comms, interrupt.py interrupts and ends waits,
kernel_info.py builds kernel_info, lifecycle.py starts and releases the guest, errors.py formats
what a failing cell shows. The package docstring (__init__.py) maps every message to its handler.

Config: `c.MicroVMKernel.<trait>` in `supermachine_kernel_config.py` in any Jupyter config dir
(`jupyter --paths`), or `--MicroVMKernel.<trait>=...` on the command line (the guest's traits are
in config.py). SUPERMACHINE_KERNEL_BACKEND=local|vm overrides the default backend.
"""
from __future__ import annotations

import concurrent.futures
import signal
import typing as t

from ipykernel.kernelbase import Kernel
from traitlets import Any, Bool, Float, List

from .. import __version__, magics
from ..machine.idle import IdleSuspender, start_idle_suspend
from ..repl_client import GuestDied, GuestRepl, GuestStuck, GuestUnavailable, ProtocolError
from . import kernel_info, lifecycle, network
from .comms import CommRouter, parent_stub
from .config import GuestConfig
from .errors import BAKING_NOTICE, error_content, execute_error_reply, guest_noun, summarize_death
from .interrupt import GuestCalls, GuestUnanswered
from .iopub import COMM_EVENTS, IopubRelay, RateLimiter
from .stdin import StdinRelay
from .workspace_hook import WorkspaceHook


class MicroVMKernel(Kernel, GuestConfig):
    implementation = "supermachine-kernel"
    implementation_version = __version__
    language = "python"
    help_links = List(kernel_info.HELP_LINKS)

    # -- configuration (plus GuestConfig's traits) -----------------------------------------------
    iopub_msg_rate_limit = Float(
        1000.0, help="Output messages per second (averaged over rate_limit_window); 0 = no limit."
    ).tag(config=True)
    iopub_data_rate_limit = Float(
        10_000_000.0, help="Output bytes per second (averaged over rate_limit_window); 0 = no "
        "limit."
    ).tag(config=True)
    rate_limit_window = Float(3.0, help="Seconds over which output rates are averaged.").tag(
        config=True
    )
    user_ns = Any(None, help="Unused: user code lives in the guest.")
    forward_sigint = Bool(True, help="Forward SIGINT received by this process to the guest "
                          "(interrupt_mode 'signal').").tag(config=True)
    interrupt_grace = Float(
        30.0, help="Seconds a cell may take to end after an interrupt before the guest's Python "
        "process (and everything it started) is killed and a fresh one started in the same VM "
        "(variables lost, files kept); a second interrupt does that at once. 0: only the second "
        "interrupt. Generous by default: under software emulation on a loaded host an "
        "interrupted cell took over 10 s to print its traceback, and a reset loses the "
        "variables.").tag(config=True)
    frame_timeout = Float(
        30.0, help="Seconds a message the guest's Python process started sending may take to "
        "complete; past that the process is killed as for an ignored interrupt. 0: no limit."
    ).tag(config=True)
    agent_ping_interval = Float(
        5.0, help="While a cell runs, ping the VM's agent every this many seconds (0: never)."
    ).tag(config=True)
    agent_ping_timeout = Float(
        15.0, help="A ping the VM's agent does not answer within this many seconds means the VM "
        "stopped answering: it is replaced by a fresh one (variables and files lost)."
    ).tag(config=True)
    startup = Any(None, help="The start-up sequence this process ran (supermachine_kernel/startup), "
                  "given by the application; None when the kernel was not started by the entry "
                  "module.")

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        for msg_type in COMM_EVENTS:
            self.shell_handlers[msg_type] = getattr(self, msg_type)
        self.guest: GuestRepl | None = None
        self.stdin = StdinRelay(self)
        self.iopub = IopubRelay(self, self.stdin, RateLimiter(
            self.iopub_msg_rate_limit, self.iopub_data_rate_limit, self.rate_limit_window),
            guest_noun(self.backend))
        self.calls = GuestCalls(self.iopub, self.stdin, self.interrupt_grace)
        self.comms = CommRouter(self, self.iopub, self.calls)
        self.host_magics: magics.HostMagics | None = None  # created by the first %magic
        self.idle: IdleSuspender | None = None  # idle suspend (machine/idle.py), set by start()
        self.network: network.NetworkHook | None = None  # set by start() (kernel/network.py)
        self.workspace_sync = WorkspaceHook(self)  # workspace_hook.py

    # -- start, shutdown and restart: lifecycle.py -----------------------------------------------

    def start(self) -> None:
        super().start()
        lifecycle.dispatch_early_requests(self, self.startup)
        backend = lifecycle.within_limits(self.make_backend(), self, self.startup)
        self.guest = self.stdin.guest = lifecycle.make_guest(
            backend, self.startup, self.iopub.on_guest_event, self.guest_env,
            self.startup_timeout)
        self.guest.frame_timeout = self.frame_timeout
        self.guest.ping_interval = self.agent_ping_interval
        self.guest.ping_timeout = self.agent_ping_timeout
        self.network = network.start(self)  # None unless allow_network opens something
        lifecycle.start_guest(self.guest,
                              self._save_launch_hint if self.startup is not None else None)
        self.idle = start_idle_suspend(self)  # None unless idle_suspend_after > 0 (vm backend)
        self.workspace_sync.start()
        if self.forward_sigint:
            signal.signal(signal.SIGINT, lambda signum, frame: self.calls.interrupt(self.guest))

    async def do_shutdown(self, restart: bool) -> dict:
        await lifecycle.shutdown_guest(self.guest, self.log)
        if self.network is not None:
            self.network.close()
        return {"status": "ok", "restart": restart}

    # -- kernel_info: kernel_info.py -------------------------------------------------------------

    @property
    def kernel_info(self) -> dict:
        return kernel_info.build(self.implementation, self.implementation_version,
                                 self.language_info, self.banner, self.help_links)

    @property
    def language_info(self) -> dict:  # type: ignore[override]
        return kernel_info.language_info(kernel_info.python_version(self.guest))

    @property
    def banner(self) -> str:  # type: ignore[override]
        guest = self.guest
        return kernel_info.banner(self.backend, guest, guest.info if guest is not None else None)

    async def kernel_info_request(self, stream: t.Any, ident: t.Any, parent: dict) -> None:
        if self.idle is not None:  # a frontend connected: resume a suspended guest now
            self.idle.resume_soon()
        await kernel_info.wait_for_python_version(self.guest, self.startup_timeout)
        await super().kernel_info_request(stream, ident, parent)

    def _publish_status(self, status: str, channel: str, parent: dict | None = None) -> None:
        # Start-up's responder already told the frontend the kernel is up; a "starting" now
        # would only restart its wait for IOPub to fall quiet.
        if status == "starting" and self.startup is not None and self.startup.answered_kernel_info:
            return
        super()._publish_status(status, channel, parent)

    def _save_launch_hint(self, started: concurrent.futures.Future) -> None:
        assert self.guest is not None
        info = dict(self.kernel_info, banner=kernel_info.banner(self.backend, self.guest, None,
                                                                starting="restoring"))
        kernel_info.save_launch_hint(self.startup, info, self.guest, started)

    # -- execute ---------------------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict | None = None,
        cell_id: str | None = None,
    ) -> dict:
        guest = self.guest
        assert guest is not None
        parent = self.get_parent("shell")
        self.iopub.begin_cell(parent)
        self.stdin.begin_cell(parent, self._get_shell_context_var(self._shell_parent_ident),
                              allow_stdin)
        if not guest.alive and getattr(guest.backend, "baking", False) and not silent:
            self.iopub.publish("stream", {"name": "stderr", "text": BAKING_NOTICE})
        try:
            code, reply = await magics.dispatch(self, code, silent)  # host-side %magics: magics/
            reply = reply or await self.workspace_sync.around_cell(
                lambda **workspace: guest.request(
                    "execute",
                    code=code,
                    silent=silent,
                    store_history=store_history,
                    user_expressions=user_expressions or {},
                    allow_stdin=allow_stdin,
                    execution_count=self.execution_count,
                    parent=parent_stub(parent),
                    **workspace,
                ), silent)
        except GuestStuck as e:  # interrupt escalation, read deadline, liveness: client.py
            reply = self._error_reply("GuestStuck", e.reason[:1].upper() + e.reason[1:], [
                "Re-run the cells that defined what you need."])
        except GuestDied as e:
            summary, details = summarize_death(e.reason)
            self.log.warning("guest died during a cell: %s", e.reason)
            reply = self._error_reply(
                "GuestDied", f"The {guest_noun(self.backend)} running this kernel died: {summary}",
                [*details, "A fresh one is starting; everything defined in earlier cells is "
                 "gone, so re-run them."])
        except GuestUnavailable as e:
            reply = self._error_reply("GuestUnavailable", str(e), [
                "The kernel will try again on the next cell. Check the kernel log for details."])
        except ProtocolError as e:
            reply = self._error_reply(
                "GuestProtocolError", f"the guest sent an invalid execute reply: {e}",
                ["The cell's result was discarded."])
        finally:
            if self.network is not None and not silent:  # connections the policy refused
                network.report(self.network, self.iopub)
            self.stdin.end_cell()
            self.iopub.end_cell()
        reply["execution_count"] = self.execution_count
        return reply

    def _error_reply(self, ename: str, evalue: str, lines: list[str]) -> dict:
        content = error_content(ename, evalue, lines)
        self.iopub.publish("error", content)
        return execute_error_reply(content)

    # -- interrupt: interrupt.py -----------------------------------------------------------------

    def _send_interrupt_children(self) -> None:
        """interrupt_request (message mode) lands here: interrupt the guest, not our own group."""
        self.calls.interrupt(self.guest)

    def pre_handler_hook(self) -> None:
        """The base swaps in Python's default SIGINT handler while a request runs; keep ours."""

    def post_handler_hook(self) -> None:
        pass

    @property
    def in_request(self) -> bool:
        """A shell request is being handled (shell_main's lock is held)."""
        return self._main_asyncio_lock.locked()

    async def shell_main(self, subshell_id: str | None, msg: t.Any) -> None:
        """One shell request at a time, comm messages included. ipykernel lets a comm message
        overtake a running cell (an async cell may await a widget), with no busy/idle of its
        own; the guest handles requests one after another anyway, so here the comm message
        waits for the cell, then runs with its own busy ... idle around the callback's output,
        as ipykernel does while a (synchronous) cell runs."""
        async with self._main_asyncio_lock:
            await self.dispatch_shell(msg, subshell_id=subshell_id)

    # -- comms: comms.py -------------------------------------------------------------------------

    async def comm_open(self, stream: t.Any, ident: t.Any, parent: dict) -> None:
        await self.comms.handle(self.guest, "comm_open", parent)

    async def comm_msg(self, stream: t.Any, ident: t.Any, parent: dict) -> None:
        await self.comms.handle(self.guest, "comm_msg", parent)

    async def comm_close(self, stream: t.Any, ident: t.Any, parent: dict) -> None:
        await self.comms.handle(self.guest, "comm_close", parent)

    async def comm_info_request(self, stream: t.Any, ident: t.Any, parent: dict) -> None:
        reply = await self.comms.comm_info(self.guest, parent)
        assert self.session is not None
        self.session.send(stream, "comm_info_reply", reply, parent, ident)

    # -- introspection: answered by the guest ----------------------------------------------------

    async def _ask(self, kind: str, fallback: dict, **fields: t.Any) -> dict:
        assert self.guest is not None
        try:
            return await self.calls.request(self.guest, kind, self.get_parent("shell"), **fields)
        except (GuestDied, GuestUnavailable, GuestUnanswered, ProtocolError) as e:
            self.log.warning("%s request failed: %s", kind, e)
            return fallback

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict:
        pos = len(code) if cursor_pos is None else cursor_pos
        return await self._ask(
            "complete",
            {"status": "ok", "matches": [], "cursor_start": pos, "cursor_end": pos, "metadata": {}},
            code=code, cursor_pos=pos,
        )

    async def do_inspect(self, code: str, cursor_pos: int, detail_level: int = 0,
                         omit_sections: t.Iterable[str] = ()) -> dict:
        return await self._ask(
            "inspect", {"status": "ok", "found": False, "data": {}, "metadata": {}},
            code=code, cursor_pos=cursor_pos, detail_level=detail_level,
            omit_sections=list(omit_sections),
        )

    async def do_is_complete(self, code: str) -> dict:
        return await self._ask("is_complete", {"status": "unknown"}, code=code)

    async def do_history(self, hist_access_type: str, output: bool, raw: bool, session: int = 0,
                         start: int = 0, stop: int | None = None, n: int | None = None,
                         pattern: str | None = None, unique: bool = False, **kw: t.Any) -> dict:
        return await self._ask(
            "history", {"status": "ok", "history": []},
            hist_access_type=hist_access_type, output=output, raw=raw, session=session,
            start=start, stop=stop, n=n, pattern=pattern, unique=unique,
        )
