"""Interrupts, their escalation, and the requests an interrupt must be able to end.

An interrupt (interrupt_request in message mode, SIGINT in signal mode) goes to the guest REPL
as SIGINT, never to the kernel's own process group, and ends a pending wait for the frontend's
input_reply. Escalation: when the requests that were running at an interrupt still run
`interrupt_grace` seconds later (user code that never checks signals, a fork bomb), or a second
interrupt comes while they run, the guest is reset (`GuestRepl.reset`, repl_client/client.py):
the REPL's process group is killed and a fresh REPL starts in the same VM; failing that, the VM
is replaced. The cell then fails with `GuestStuck`, whose message says which step was taken. `GuestCalls.request` sends a request to the guest on behalf of a shell request
(comms, completion, inspection, history): once an interrupt came and the guest has not
answered within INTERRUPT_GRACE seconds, the kernel stops waiting (`GuestUnanswered`), so a
guest that ignores the interrupt cannot hold the shell channel.

Everything the guest sends while it handles such a request (a widget callback's prints,
echo_update, an Output widget's msg_id) is published with the request as its parent, and before
the reply resolves (the client delivers guest frames in order; the guest answers only after
flushing the handler's output), so it lands between the request's busy and idle.
"""
from __future__ import annotations

import asyncio
import threading
import typing as t

from ..repl_client import GuestRepl
from .iopub import IopubRelay
from .stdin import StdinRelay

# Seconds the kernel still waits for the guest's answer to a comm or introspection request after
# an interrupt before it gives up on it (the guest then ignored the interrupt).
INTERRUPT_GRACE = 5.0


class GuestUnanswered(RuntimeError):
    """The guest did not answer a request, and the kernel stopped waiting (an interrupt)."""


class GuestCalls:
    """One per kernel: requests to the guest that an interrupt can end, and the interrupt."""

    def __init__(self, iopub: IopubRelay, stdin: StdinRelay, grace: float = 30.0) -> None:
        self._iopub = iopub
        self._stdin = stdin
        self._interrupted: asyncio.Event | None = None  # set on the guest's loop by an interrupt
        #: Seconds the requests running at an interrupt may take to end before the guest is
        #: reset (0: only a second interrupt resets it).
        self.grace = grace
        self._watched: set[int] = set()  # ids of the requests running at the last interrupt
        self._timer: asyncio.TimerHandle | None = None

    def interrupt(self, guest: GuestRepl | None) -> None:
        """SIGINT to the guest (from a worker thread), the end of the waits it concerns, and
        the escalation (see the module doc). Safe from any thread and from a signal handler."""
        self._stdin.cancel()
        if guest is None:
            return
        if self._interrupted is not None:
            guest.loop.call_soon_threadsafe(self._interrupted.set)
        guest.loop.call_soon_threadsafe(self._escalate_or_wait, guest)
        threading.Thread(target=guest.interrupt, name="guest-interrupt", daemon=True).start()

    def _escalate_or_wait(self, guest: GuestRepl) -> None:
        """On the loop, at an interrupt: reset the guest if an earlier interrupt's requests
        still run, else give the running requests `grace` seconds to end."""
        running = guest.pending_ids()
        if self._watched & running:
            self._escalate(guest, "a second interrupt came while the cell still ran")
            return
        self._watched = running
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if running and self.grace > 0:
            self._timer = guest.loop.call_later(self.grace, self._grace_over, guest, running)

    def _grace_over(self, guest: GuestRepl, watched: set[int]) -> None:
        self._timer = None
        if watched & guest.pending_ids():
            self._escalate(guest, f"the interrupt was ignored for {self.grace:g} s")

    def _escalate(self, guest: GuestRepl, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watched = set()
        asyncio.ensure_future(guest.reset(why), loop=guest.loop)

    async def request(self, guest: GuestRepl, kind: str, shell_request: dict, /,
                      **fields: t.Any) -> dict:
        """`kind` sent to the guest on behalf of `shell_request`; returns the guest's reply.
        Runs on the guest's loop (from another loop it hops there). Raises GuestUnanswered
        (see the module doc), and GuestDied, GuestUnavailable, ProtocolError like
        `GuestRepl.request`."""
        main = guest.loop
        if asyncio.get_running_loop() is not main:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                self.request(guest, kind, shell_request, **fields), main))
        self._iopub.last_parent = shell_request
        if self._interrupted is None:
            self._interrupted = asyncio.Event()
        interrupted = self._interrupted
        interrupted.clear()
        reply = asyncio.ensure_future(guest.request(kind, **fields))
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
            reply.cancel()  # a late reply is then dropped by the client
