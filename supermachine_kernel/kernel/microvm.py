"""MicroVMKernel: the "Python (microVM)" Jupyter kernel. Every cell runs in the guest REPL.

The kernel overrides ipykernel's `do_*` hooks only and delegates every guest call to one
`GuestRepl` (repl_client/client.py). What it adds to the base class, because a proxy kernel needs
it: comm_open/comm_msg/comm_close forwarding (the base has none), an interrupt that reaches the
guest (the base signals its own process group), `kernel_info` without a debugger or subshells it
does not have, stdin forwarding for the guest's `input()`, output rate limiting, and recovery
when the guest dies.

Run by the application (app.py) that `python -m supermachine_kernel.kernel` starts; the
guest's VM is restored when the kernel starts (or was already, by start-up), and the restored
REPL warms itself up while no request waits (guest/repl.py).
Config: `c.MicroVMKernel.<trait>` in `supermachine_kernel_config.py` in any Jupyter config dir
(`jupyter --paths`), or `--MicroVMKernel.<trait>=...` on the command line. The environment
variable SUPERMACHINE_KERNEL_BACKEND=local|vm overrides the default backend.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import json
import os
import re
import signal
import threading
import time
import typing as t

import zmq
from ipykernel.kernelbase import Kernel, kernel_protocol_version
from traitlets import Any, Bool, Float, List

from .. import __version__, magics
from ..repl_client import GuestDied, GuestRepl, GuestUnavailable, ProtocolError, guest_environment
from .config import GuestConfig
from .ratelimit import RateLimiter

DISPLAY_EVENTS = ("display_data", "update_display_data")
COMM_EVENTS = ("comm_open", "comm_msg", "comm_close")
LIMITED_EVENTS = ("stream", *DISPLAY_EVENTS, "execute_result", "error", "clear_output", *COMM_EVENTS)
RED, RESET = "\x1b[0;31m", "\x1b[0m"
# Seconds the kernel still waits for the guest's answer to a comm or introspection request after
# an interrupt before it gives up on it (the guest then ignored the interrupt).
INTERRUPT_GRACE = 5.0
BAKING_NOTICE = (
    "[supermachine] First start with this configuration: baking the warm VM snapshot (boot, "
    "start Python, import the warmup modules). Under TCG this takes a few minutes, once; "
    "`supermachine-kernel prepare` does it ahead of time.\n"
)


class GuestUnanswered(RuntimeError):
    """The guest did not answer a request, and the kernel stopped waiting (an interrupt)."""


def _parent_stub(parent: dict) -> dict:
    """The part of a request's header the guest may know (libraries route output by msg_id)."""
    header = parent.get("header") or {}
    return {"header": {"msg_id": header.get("msg_id", ""), "msg_type": header.get("msg_type", "")}}


def _approx_size(content: dict) -> int:
    data = content.get("data") or {}
    size = 0
    for value in data.values():
        size += len(value) if isinstance(value, str) else len(json.dumps(value))
    return size + len(content.get("text", ""))


_NOTABLE = re.compile(r"panic|out of memory|oom-kill|killed process|exited|killed by|signal",
                      re.IGNORECASE)


def summarize_death(reason: str, max_details: int = 8) -> tuple[str, list[str]]:
    """A guest death reason (which may end in a whole console dump) as one readable sentence
    plus a few notable detail lines for the traceback."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    if not lines:
        return "no reason was reported.", []
    head = lines[0]
    notable = [ln for ln in lines[1:] if _NOTABLE.search(ln)]
    summary = " ".join([head, *notable[:2]])
    if len(summary) > 500:
        summary = summary[:497] + "..."
    details = [ln for ln in lines[1:] if ln not in notable[:2]][-max_details:]
    return summary.rstrip(".") + ".", details


class MicroVMKernel(Kernel, GuestConfig):
    implementation = "supermachine-kernel"
    implementation_version = __version__
    language = "python"
    help_links = List(
        [
            {"text": "Python Reference", "url": "https://docs.python.org/3/"},
            {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
        ]
    )

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

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        for msg_type in COMM_EVENTS:
            self.shell_handlers[msg_type] = getattr(self, msg_type)
        self.guest: GuestRepl | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._exec_parent: dict | None = None
        self._exec_ident: t.Any = None
        self._last_parent: dict = {}
        self._allow_stdin = False
        self._cell_error_seen = False
        self._input_cancel = threading.Event()
        self._interrupted: asyncio.Event | None = None  # set on the main loop by an interrupt
        self._limiter = RateLimiter(
            self.iopub_msg_rate_limit, self.iopub_data_rate_limit, self.rate_limit_window
        )

    # -- lifecycle -------------------------------------------------------------------------------

    startup = Any(None, help="The start-up sequence this process ran (supermachine_kernel/startup), "
                  "given by the application; None when the kernel was not started by the entry "
                  "module.")

    def start(self) -> None:
        super().start()
        self._dispatch_early_requests()
        self._main_loop = asyncio.get_event_loop()
        backend = self.make_backend()
        early_vm = self.startup.take_vm() if self.startup is not None else None
        if early_vm is not None:
            if hasattr(backend, "early"):
                backend.early = early_vm  # adopted if the configuration names its snapshot
            else:
                early_vm.release()
        self.guest = GuestRepl(
            backend,
            self._main_loop,
            self._on_guest_event,
            env=guest_environment(dict(self.guest_env)),
            startup_timeout=self.startup_timeout,
        )
        started = self.guest.start()
        if self.startup is not None:
            started.add_done_callback(self._save_launch_hint)
        if self.forward_sigint:
            signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        atexit.register(self._release_at_exit)

    def _dispatch_early_requests(self) -> None:
        """The request the early responder read but did not answer (early_start.py): handed to
        the shell handlers before anything the socket delivers from now on."""
        stash = self.startup.early_stash if self.startup is not None else []
        for frames in stash:
            msg = [zmq.Frame(f) for f in frames]
            if self.shell_channel_thread:
                self.shell_channel_thread.io_loop.add_callback(self.shell_channel_thread_main, msg)
            else:
                self.io_loop.add_callback(self.shell_main, None, msg)

    def _publish_status(self, status, channel, parent=None):  # type: ignore[override]
        # The early responder already told the frontend the kernel is up; a "starting" now
        # would only restart its wait for IOPub to fall quiet.
        if status == "starting" and self.startup is not None and self.startup.answered_kernel_info:
            return
        super()._publish_status(status, channel, parent)

    def _save_launch_hint(self, started: t.Any) -> None:
        """Once the first guest runs: what the next kernel with this command line may use
        before its imports (launch_hint.py)."""
        if self.startup is None or started.cancelled() or started.exception() is not None:
            return
        info = dict(self.kernel_info, banner=self._banner_text(None, starting="restoring"))
        self.startup.save_hint(info, getattr(self.guest.backend, "snapshot_path", None))

    def _release_at_exit(self) -> None:
        # An early VM is the backend's by now (start() handed it over; close() releases it).
        guest = self.guest
        if guest is None:
            return
        guest.backend.close()  # first, so the pool destroys what is given back (no restore)
        link = guest._link
        if link is not None:
            link.closing = True
            link.close()

    def _on_sigterm(self, signum: int, frame: t.Any) -> None:
        # Release the guest now (no VM may outlive us), then exit without unwinding threads.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            self._release_at_exit()
        finally:
            os._exit(0)

    @property
    def banner(self) -> str:  # type: ignore[override]
        return self._banner_text(self.guest.info if self.guest is not None else None)

    def _banner_text(self, info: t.Any, starting: str = "starting") -> str:
        head = info.banner if info else (self.guest.info.banner if self.guest and self.guest.info
                                         else "Python (microVM)")
        where = info.where if info else f"{self.backend} backend ({starting})"
        text = f"{head}\nRunning in: {where}"
        if self.backend == "local":
            text += "\nWARNING: the local backend is NOT isolated: code runs on the host."
        return text

    @property
    def language_info(self) -> dict:  # type: ignore[override]
        return {
            "name": "python",
            "version": self._guest_python_version() or "3",
            "mimetype": "text/x-python",
            "codemirror_mode": {"name": "ipython", "version": 3},
            "pygments_lexer": "ipython3",
            "nbconvert_exporter": "python",
            "file_extension": ".py",
        }

    @property
    def kernel_info(self) -> dict:
        # Built here rather than by the base property, which imports ipykernel.debugger (and
        # debugpy: 60-160 ms before the first reply) only to learn a feature we do not offer.
        # No debugger, and no subshells: the guest runs one request at a time.
        return {
            "protocol_version": kernel_protocol_version,
            "implementation": self.implementation,
            "implementation_version": self.implementation_version,
            "language_info": self.language_info,
            "banner": self.banner,
            "help_links": self.help_links,
            "supported_features": [],
        }

    async def kernel_info_request(self, stream, ident, parent):  # type: ignore[override]
        # language_info carries the guest's Python version. The image knows it before any VM
        # answers, so wait only until either the image or the first guest is there.
        guest = self.guest
        deadline = time.monotonic() + self.startup_timeout
        while (guest is not None and self._guest_python_version() is None
               and time.monotonic() < deadline):
            starting = guest.starting_future()
            if starting is not None and starting.done() and starting.exception() is not None:
                break  # it failed: answer anyway; execute will report why
            await asyncio.sleep(0.01)
        await super().kernel_info_request(stream, ident, parent)

    def _guest_python_version(self) -> str | None:
        guest = self.guest
        if guest is None:
            return None
        if guest.info is not None:
            return guest.info.python_version
        return getattr(guest.backend, "python_version", None)

    async def _on_main(self, coro: t.Awaitable) -> t.Any:
        """Await `coro` on the shell loop (where the session lives), from any thread's loop."""
        main = self._main_loop
        if main is None or asyncio.get_running_loop() is main:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, main))

    async def do_shutdown(self, restart: bool) -> dict:
        if self.guest is not None:
            try:
                await self._on_main(self.guest.shutdown())
            except Exception:  # noqa: BLE001
                self.log.exception("releasing the guest failed")
        return {"status": "ok", "restart": restart}

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
        assert self.guest is not None
        parent = self.get_parent("shell")
        self._exec_parent = self._last_parent = parent
        self._exec_ident = self._get_shell_context_var(self._shell_parent_ident)
        self._allow_stdin = allow_stdin
        self._cell_error_seen = False
        self._input_cancel.clear()
        if not self.guest.alive and getattr(self.guest.backend, "baking", False) and not silent:
            self._publish("stream", {"name": "stderr", "text": BAKING_NOTICE})
        try:
            code, reply = await magics.dispatch(self, code, silent)  # host-side %magics: magics/
            reply = reply or await self.guest.request(
                "execute",
                code=code,
                silent=silent,
                store_history=store_history,
                user_expressions=user_expressions or {},
                allow_stdin=allow_stdin,
                execution_count=self.execution_count,
                parent=_parent_stub(parent),
            )
        except GuestDied as e:
            summary, details = summarize_death(e.reason)
            self.log.warning("guest died during a cell: %s", e.reason)
            reply = self._error_reply(
                "GuestDied",
                f"The {self._guest_noun()} running this kernel died: {summary}",
                "A fresh one is starting; everything defined in earlier cells is gone, "
                "so re-run them.",
                details,
            )
        except GuestUnavailable as e:
            reply = self._error_reply(
                "GuestUnavailable", str(e),
                "The kernel will try again on the next cell. Check the kernel log for details.",
            )
        except ProtocolError as e:
            reply = self._error_reply(
                "GuestProtocolError", f"the guest sent an invalid execute reply: {e}",
                "The cell's result was discarded.",
            )
        finally:
            self._allow_stdin = False
            self._input_cancel.set()
            self._report_dropped(final=True)
            self._exec_parent = None
        reply["execution_count"] = self.execution_count
        return reply

    def _guest_noun(self) -> str:
        return "microVM" if self.backend == "vm" else f"guest process ({self.backend} backend)"

    def _error_reply(self, ename: str, evalue: str, hint: str, details: list[str] = ()) -> dict:
        content = {
            "ename": ename,
            "evalue": evalue,
            "traceback": [f"{RED}{ename}{RESET}: {evalue}", *details, hint],
        }
        self._publish("error", content)
        return dict(content, status="error", user_expressions={}, payload=[])

    # -- guest events ------------------------------------------------------------------------------

    def _publish(self, msg_type: str, content: dict, *, buffers: list | None = None,
                 metadata: dict | None = None, parent: dict | None = None) -> None:
        if self.session is None:
            return
        self.session.send(
            self.iopub_socket,
            msg_type,
            content,
            parent if parent is not None else (self._exec_parent or self._last_parent),
            ident=self._topic(msg_type),
            buffers=buffers,
            metadata=metadata,
        )

    def _on_guest_event(self, kind: str, content: dict, buffers: list) -> None:
        """Called on the shell loop, in guest order, for everything the guest says unasked."""
        if kind in LIMITED_EVENTS:
            # Everything the guest publishes counts against the rate limits; only the first
            # error of a cell always gets through, so a flood cannot hide why a cell failed.
            size = _approx_size(content) + sum(len(b) for b in buffers)
            first_error = kind == "error" and not self._cell_error_seen
            if not self._limiter.allow(size, time.monotonic()) and not first_error:
                self._report_dropped(final=False)
                return
            if kind == "error":
                self._cell_error_seen = True
            if kind in COMM_EVENTS:
                metadata = content.pop("__metadata__", {})
                self._publish(kind, content, buffers=buffers, metadata=metadata)
            else:
                self._publish(kind, content)
        elif kind == "input_request":
            asyncio.ensure_future(self._forward_input(content))
        elif kind == "died":
            self._input_cancel.set()
            if self._exec_parent is None:  # nothing running: tell whoever is watching
                self._publish("stream", {
                    "name": "stderr",
                    "text": f"The {self._guest_noun()} died ({content['reason']}); a fresh one is "
                            "starting. Variables from earlier cells are gone.\n",
                })
        elif kind == "invalid":
            self.log.warning("invalid %s message from the guest: %s", content["type"], content["error"])
            if not self._limiter.allow(len(content["error"]), time.monotonic()):
                return
            self._publish("stream", {
                "name": "stderr",
                "text": f"[supermachine] dropped an invalid {content['type']!r} message from the "
                        f"guest: {content['error']}\n",
            })

    def _report_dropped(self, final: bool) -> None:
        if final:
            dropped = self._limiter.take_dropped()
            if not dropped.messages:
                return
            text = (
                f"\n[supermachine] IOPub rate limit: {dropped.messages} output messages "
                f"({dropped.bytes / 1e6:.1f} MB) were dropped in this cell.\n"
            )
        elif self._limiter.should_notice():
            text = (
                "\n[supermachine] IOPub output rate exceeded: output is being dropped to keep the "
                "frontend responsive.\nCurrent limits: "
                f"c.MicroVMKernel.iopub_data_rate_limit = {self.iopub_data_rate_limit:g} bytes/s, "
                f"c.MicroVMKernel.iopub_msg_rate_limit = {self.iopub_msg_rate_limit:g} msgs/s "
                f"(over {self.rate_limit_window:g} s; 0 disables).\n"
            )
        else:
            return
        self._publish("stream", {"name": "stderr", "text": text})

    # -- stdin -------------------------------------------------------------------------------------

    async def _forward_input(self, content: dict) -> None:
        assert self.guest is not None
        parent, ident = self._exec_parent, self._exec_ident
        if parent is None or not self._allow_stdin:
            self.guest.notify("input_reply", error="this frontend does not support input requests")
            return
        self._input_cancel.clear()
        value = await asyncio.to_thread(
            self._await_input_reply, content["prompt"], content["password"], ident, parent
        )
        if value is not None:
            self.guest.notify("input_reply", value=value)

    def _await_input_reply(self, prompt: str, password: bool, ident: t.Any, parent: dict) -> str | None:
        """input_request to the frontend, then its reply (None if interrupted). Worker thread."""
        assert self.session is not None
        while True:  # drop stale replies
            try:
                self.stdin_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno == zmq.EAGAIN:
                    break
                raise
        self.session.send(self.stdin_socket, "input_request",
                          {"prompt": prompt, "password": password}, parent, ident=ident)
        while not self._input_cancel.is_set():
            rlist, _, xlist = zmq.select([self.stdin_socket], [], [self.stdin_socket], 0.05)
            if not (rlist or xlist):
                continue
            try:
                _, reply = self.session.recv(self.stdin_socket)
            except Exception:  # noqa: BLE001
                self.log.warning("invalid input_reply", exc_info=True)
                continue
            if reply is None:
                continue
            try:
                return str(reply["content"]["value"])
            except (KeyError, TypeError):
                self.log.error("bad input_reply: %s", reply)
                return ""
        return None

    # -- interrupt ---------------------------------------------------------------------------------

    def pre_handler_hook(self) -> None:
        """The base swaps in Python's default SIGINT handler while a request runs; keep ours."""

    def post_handler_hook(self) -> None:
        pass

    def _on_sigint(self, signum: int, frame: t.Any) -> None:
        self._interrupt_guest()

    def _send_interrupt_children(self) -> None:
        """interrupt_request (message mode) lands here: interrupt the guest, not our own group."""
        self._interrupt_guest()

    def _interrupt_guest(self) -> None:
        self._input_cancel.set()
        loop = self._main_loop
        if loop is not None and self._interrupted is not None:
            loop.call_soon_threadsafe(self._interrupted.set)  # see _guest_request
        guest = self.guest
        if guest is not None:
            threading.Thread(target=guest.interrupt, name="guest-interrupt", daemon=True).start()

    # -- requests the guest answers for the frontend (comms, introspection) ----------------------
    #
    # Everything the guest sends while it handles such a request (a widget callback's prints,
    # echo_update, an Output widget's msg_id) is published with the request as its parent, and
    # before the reply resolves (the session delivers guest frames in order; the guest answers
    # only after flushing the handler's output). So it all lands between ipykernel's busy and
    # idle for that request, where frontends route it (ipykernel: the same).

    async def shell_main(self, subshell_id: str | None, msg: t.Any) -> None:  # type: ignore[override]
        """One shell request at a time, comm messages included. ipykernel lets a comm message
        overtake a running cell (an async cell may await a widget), with no busy/idle of its
        own; the guest handles requests one after another anyway, so here the comm message
        waits for the cell, then runs with its own busy ... idle around the callback's output,
        as ipykernel does while a (synchronous) cell runs."""
        async with self._main_asyncio_lock:
            await self.dispatch_shell(msg, subshell_id=subshell_id)

    async def _guest_request(self, kind: str, shell_request: dict, /, **fields: t.Any) -> dict:
        """`kind` sent to the guest on behalf of `shell_request`; returns the guest's reply.
        An interrupt ends the wait once the guest has not answered within INTERRUPT_GRACE
        seconds (raises GuestUnanswered): a guest that ignores it cannot hold the shell channel.
        Raises GuestDied, GuestUnavailable, ProtocolError like `GuestRepl.request`."""
        assert self.guest is not None
        main = self._main_loop
        if main is not None and asyncio.get_running_loop() is not main:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                self._guest_request(kind, shell_request, **fields), main))
        self._last_parent = shell_request
        if self._interrupted is None:
            self._interrupted = asyncio.Event()
        interrupted = self._interrupted
        interrupted.clear()
        reply = asyncio.ensure_future(self.guest.request(kind, **fields))
        interrupt = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait((reply, interrupt), return_when=asyncio.FIRST_COMPLETED)
            if not reply.done():
                await asyncio.wait((reply,), timeout=INTERRUPT_GRACE)
            if not reply.done():
                raise GuestUnanswered(
                    f"the guest did not answer the {kind} request within {INTERRUPT_GRACE:g} s "
                    "of an interrupt; the kernel stopped waiting for it")
            return reply.result()
        finally:
            interrupt.cancel()
            reply.cancel()  # a late reply is then dropped by the session

    async def comm_open(self, stream, ident, parent) -> None:
        await self._forward_comm("comm_open", parent)

    async def comm_msg(self, stream, ident, parent) -> None:
        await self._forward_comm("comm_msg", parent)

    async def comm_close(self, stream, ident, parent) -> None:
        await self._forward_comm("comm_close", parent)

    async def _forward_comm(self, kind: str, parent: dict) -> None:
        """The frontend's comm message to the guest's comm manager; returns once the guest's
        handler (user code: widget callbacks) finished and its output was published."""
        content = parent.get("content") or {}
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str):
            return
        self._last_parent = parent
        if self.guest is None or not self.guest.alive:  # no guest: its comms died with it
            if kind == "comm_open":  # nobody to talk to: close it on the frontend
                self._publish("comm_close", {"comm_id": comm_id, "data": {}}, parent=parent)
            return
        fields: dict[str, t.Any] = {
            "comm_id": comm_id,
            "data": content.get("data") or {},
            "metadata": parent.get("metadata") or {},
            "buffers": [base64.b64encode(bytes(b)).decode("ascii") for b in parent.get("buffers") or []],
            "parent": _parent_stub(parent),
        }
        if kind == "comm_open":
            fields["target_name"] = str(content.get("target_name", ""))
            fields["target_module"] = content.get("target_module")
        try:
            reply = await self._guest_request(kind, parent, **fields)
        except (GuestDied, GuestUnavailable, GuestUnanswered, ProtocolError) as e:
            self.log.warning("%s %s: %s", kind, comm_id, e)  # a death is announced on IOPub
            return
        if reply.get("status") == "error":  # ipykernel logs a failing comm handler, too
            self.log.warning("%s %s failed in the guest: %s: %s", kind, comm_id,
                             reply.get("ename"), reply.get("evalue"))

    async def comm_info_request(self, stream, ident, parent) -> None:  # type: ignore[override]
        target = (parent.get("content") or {}).get("target_name")
        reply: dict = {"status": "ok", "comms": {}}
        if self.guest is not None and self.guest.alive:
            try:
                reply = await asyncio.wait_for(
                    self._guest_request("comm_info", parent, target_name=target), 10
                )
            except Exception as e:  # noqa: BLE001
                self.log.warning("comm_info from the guest failed: %s", e)
        self.session.send(stream, "comm_info_reply", reply, parent, ident)

    # -- introspection -----------------------------------------------------------------------------

    async def _ask(self, kind: str, fallback: dict, **fields: t.Any) -> dict:
        assert self.guest is not None
        try:
            return await self._guest_request(kind, self.get_parent("shell"), **fields)
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


