"""The stdin relay: the guest's `input()` and `getpass()` answered by the frontend.

The guest's input_request frame becomes an input_request on the kernel's stdin channel, sent to
the frontend that runs the cell (if it allowed stdin); the frontend's input_reply goes back to
the guest as an input_reply frame. The wait runs on a worker thread and ends on an interrupt,
when the guest dies or when the cell ends (`cancel`).

One request is with the frontend at a time (guest threads may call input() together, and a
hostile guest may send input_request frames at will): the others wait their turn. A request
belongs to the cell running when its frame arrived; one whose cell has ended by its turn is
dropped, never sent to the frontend (the guest's input() raised EOFError at the cell's end, as
ipykernel refuses input for a finished cell).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import typing as t

import zmq
from ipykernel.kernelbase import Kernel

from ..repl_client import GuestRepl


class StdinRelay:
    """One per kernel. `guest` is set once the kernel started its guest."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self.guest: GuestRepl | None = None
        self._parent: dict | None = None
        self._ident: t.Any = None
        self._allowed = False
        self._cell = 0  # bumped when a cell begins and when it ends
        self._turn = asyncio.Lock()  # one request with the frontend at a time
        self._cancel = threading.Event()  # the current request's; a fresh one per request
        self.dropped = 0  # requests dropped because their cell had ended

    def begin_cell(self, parent: dict, ident: t.Any, allow_stdin: bool) -> None:
        """The execute request whose frontend answers input requests until `end_cell`."""
        self._parent, self._ident, self._allowed = parent, ident, allow_stdin
        self._cell += 1

    def end_cell(self) -> None:
        self._allowed = False
        self._cell += 1
        self._cancel.set()
        self._parent = None

    def cancel(self) -> None:
        """Stop waiting for the frontend's reply (thread-safe): an interrupt, a dead guest."""
        self._cancel.set()

    async def forward(self, content: dict) -> None:
        """The guest's input_request (validated frame content) to the frontend, and the reply
        back to the guest; a frontend that allows no input gets the guest an error instead.
        Runs on the shell loop, called in guest order."""
        guest = self.guest
        assert guest is not None
        cell = self._cell
        if self._parent is None or not self._allowed:
            guest.notify("input_reply", error="this frontend does not support input requests")
            return
        async with self._turn:
            if cell != self._cell:  # its cell ended while it waited its turn
                self.dropped += 1
                return
            parent, ident = self._parent, self._ident
            assert parent is not None
            self._cancel = cancel = threading.Event()
            value = await asyncio.to_thread(
                self._await_input_reply, content["prompt"], content["password"], ident, parent,
                cancel)
        if value is not None and cell == self._cell:
            guest.notify("input_reply", value=value)

    def _await_input_reply(self, prompt: str, password: bool, ident: t.Any, parent: dict,
                           cancel: threading.Event) -> str | None:
        """input_request to the frontend, then its reply (None if cancelled). Worker thread."""
        kernel = self._kernel
        session, socket = kernel.session, kernel.stdin_socket
        assert session is not None
        while True:  # drop stale replies
            try:
                socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno == zmq.EAGAIN:
                    break
                raise
        # A ROUTER drops a message for a peer it does not know yet, silently: a frontend whose
        # stdin channel is still connecting (a kernel just started) would never see the
        # request. With ROUTER_MANDATORY the send fails instead, and is tried again.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for attempt in itertools.count():
            try:
                session.send(socket, "input_request", {"prompt": prompt, "password": password},
                             parent, ident=ident)
                break
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                if attempt == 0:  # once: a frontend that never connects would flood the log
                    kernel.log.info("input_request: the frontend's stdin channel is not "
                                    "connected yet; trying again every 50 ms")
                if cancel.wait(0.05):
                    return None
        while not cancel.is_set():
            rlist, _, xlist = zmq.select([socket], [], [socket], 0.05)
            if not (rlist or xlist):
                continue
            try:
                _, reply = session.recv(socket)
            except Exception:  # noqa: BLE001
                kernel.log.warning("invalid input_reply", exc_info=True)
                continue
            if reply is None:
                continue
            try:
                return str(reply["content"]["value"])
            except (KeyError, TypeError):
                kernel.log.error("bad input_reply: %s", reply)
                return ""
        return None
