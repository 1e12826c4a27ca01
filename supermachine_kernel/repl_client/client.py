"""GuestRepl: the kernel's one client object for the guest REPL (start, requests, events, death).

Threads and the loop: every blocking call (launching, `write_stdin`, `read_stdout`, signals) runs
on worker threads; results and guest events are handed to the kernel's asyncio loop with
`call_soon_threadsafe`, in the order the guest sent them, so all output of a cell is published
before its reply resolves. Requests are `await repl.request(kind, **fields)`; guest-initiated
messages (stream, display, comm, input_request) go to `on_event(kind, content, buffers)` on the
loop. The reader thread stops reading while too many events wait for the loop (flow control: a
guest that floods output is slowed down, host memory stays bounded).

One `_Link` per guest incarnation. When the guest dies (REPL exits, VM dies, bad frame) the link
fails its pending requests with `GuestDied(reason)`, emits a `died` event, and `GuestRepl` starts
a fresh guest at once unless it is shutting down.

A guest that is alive but stuck is ended by `reset(why)` (the kernel's interrupt escalation,
kernel/interrupt.py, calls it too): the REPL's whole process group is killed and a fresh REPL
starts in the same VM (variables lost, files kept); when that cannot be done (the agent does not
answer, the backend cannot start a REPL in place) the VM is destroyed and a fresh one launched.
Pending requests fail with `GuestStuck`, whose message says which step was taken and what was
lost. Two watchers call it on their own: the reader, when a frame the guest started is not
complete within `frame_timeout` seconds (a header announcing a body that never comes), and the
liveness watchdog, which pings the VM's agent every `ping_interval` seconds while a request is
pending and gives up on it when a ping is not answered within `ping_timeout`.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..log_limit import LogLimiter, quote
from .backend import Backend, GuestHandle, driver_source
from .frames import FrameDecoder, ProtocolError, encode_frame, validate_event, validate_reply

log = logging.getLogger("supermachine_kernel.repl_client")

EventCallback = Callable[[str, dict, list], None]

MAX_EVENTS_IN_FLIGHT = 256
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024


class _Budget:
    """Bounds what the reader has handed to the loop but the loop has not processed yet.

    The reader blocks (and so, through the pipe, the guest) while the loop is behind: at most
    MAX_EVENTS_IN_FLIGHT events and MAX_BYTES_IN_FLIGHT encoded bytes (one oversized event may
    pass alone).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events = 0
        self._bytes = 0

    def acquire(self, size: int) -> None:
        with self._cond:
            while self._events and (self._events >= MAX_EVENTS_IN_FLIGHT
                                    or self._bytes + size > MAX_BYTES_IN_FLIGHT):
                self._cond.wait()
            self._events += 1
            self._bytes += size

    def release(self, size: int) -> None:
        with self._cond:
            self._events -= 1
            self._bytes -= size
            self._cond.notify_all()


class GuestDied(RuntimeError):
    """The guest REPL (or its VM) went away while a request was pending."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GuestStuck(GuestDied):
    """The guest was stuck and was reset (`GuestRepl.reset`): the message says why, which step
    was taken (Python process killed, or VM replaced) and what was lost."""


class GuestUnavailable(RuntimeError):
    """No guest could be started (the message says why and what to do)."""


@dataclass(frozen=True)
class GuestInfo:
    python_version: str
    implementation: str
    executor: str
    banner: str
    comms: bool
    where: str


def _size(n: int) -> str:
    return f"{n / 1048576:.1f} MB" if n >= 1048576 else f"{n} byte" + ("" if n == 1 else "s")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Link:
    """One running guest REPL: its handle, reader/writer/stderr threads and pending requests."""

    def __init__(self, client: GuestRepl, handle: GuestHandle) -> None:
        self.client = client
        self.handle = handle
        self.loop = client.loop
        self.pending: dict[int, tuple[str, asyncio.Future]] = {}
        self.ready: concurrent.futures.Future[GuestInfo] = concurrent.futures.Future()
        self.dead = False
        self.closing = False
        self.was_ready = False
        self.stderr_tail: collections.deque[bytes] = collections.deque(maxlen=64)
        self._stderr_log = LogLimiter(burst=10)  # debug lines of guest stderr a minute
        self._outq: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._in_flight = _Budget()
        self._died_once = threading.Lock()
        self.watchdog: asyncio.Task | None = None  # GuestRepl._watchdog while requests wait

    def start(self) -> None:
        for target, name in (
            (self._read_loop, "guest-reader"),
            (self._write_loop, "guest-writer"),
            (self._stderr_loop, "guest-stderr"),
        ):
            threading.Thread(target=target, name=name, daemon=True).start()

    # -- outgoing ------------------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        if not self.dead:
            self._outq.put(encode_frame(msg))

    def _write_loop(self) -> None:
        while True:
            frame = self._outq.get()
            if frame is None or self.dead:
                return
            try:
                self.handle.child.write_stdin(frame)
            except Exception as e:  # noqa: BLE001 - any failure here means the guest is gone
                self._die(f"writing to the guest REPL failed: {type(e).__name__}: {e}", exc=e)
                return

    # -- incoming ------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        exc: BaseException | None = None
        limit = self.client.frame_timeout
        deadline: float | None = None  # set while a frame is incomplete (see the module doc)
        try:
            while True:
                if deadline is None or limit <= 0:
                    data = self.handle.child.read_stdout(65536)
                else:
                    try:
                        data = self.handle.child.read_stdout(
                            65536, timeout=max(deadline - time.monotonic(), 0.0))
                    except TimeoutError:
                        if self.closing or self.dead:
                            return
                        size = decoder.announced
                        what = "a message" if size is None else f"a {_size(size)} message"
                        self.loop.call_soon_threadsafe(
                            self.client._on_stuck, self,
                            f"the Python process began sending {what} to the kernel and did not "
                            f"finish it within {limit:g} s")
                        return
                if not data:
                    break
                # Frame by frame: what came before a bad frame is delivered before it kills
                # the session (the cell's output up to where the guest broke the framing).
                decoded = 0
                for size, raw in decoder.iter_sized(data):
                    self._deliver(size, raw)
                    decoded += 1
                if not decoder.pending:
                    deadline = None
                elif decoded or deadline is None:  # a new frame began: its own deadline
                    deadline = time.monotonic() + limit
        except ProtocolError as e:
            self._die(f"the guest REPL sent an invalid frame ({e}); it was stopped", fatal=True)
            return
        except Exception as e:  # noqa: BLE001 - VmDiedError and friends
            exc = e
        self._die(None, exc=exc)

    def _deliver(self, size: int, raw: dict[str, Any]) -> None:
        try:
            kind, content, buffers = validate_event(raw)
        except ProtocolError as e:
            # The type may be megabytes of guest text: keep what a notice quotes (kernel/iopub.py).
            kind, content, buffers = "invalid", {
                "error": str(e)[:1000], "type": str(raw.get("type"))[:1000], "size": size}, []
        self._in_flight.acquire(size)
        self.loop.call_soon_threadsafe(self._on_loop, kind, content, buffers, size)

    def _on_loop(self, kind: str, content: dict, buffers: list, size: int) -> None:
        try:
            if kind == "reply":
                entry = self.pending.pop(content["id"], None)
                if entry is None:
                    return
                request, fut = entry
                if fut.done():
                    return
                try:
                    fut.set_result(validate_reply(request, content["content"]))
                except ProtocolError as e:
                    fut.set_exception(e)
            elif kind == "ready":
                info = GuestInfo(where=self.handle.describe(), **content)
                self.was_ready = True
                if not self.ready.done():
                    self.ready.set_result(info)
                self.client._on_ready(self, info)
            elif self.client._link is self:
                if self.client.gate is not None:
                    self.client.gate.touch()
                self.client.on_event(kind, content, buffers)
        except Exception:  # an event handler bug must not stop the reader
            log.exception("error handling guest %s event", kind)
        finally:
            self._in_flight.release(size)

    def _stderr_loop(self) -> None:
        while True:
            try:
                data = self.handle.child.read_stderr(65536)
            except Exception:  # noqa: BLE001
                return
            if not data:
                return
            self.stderr_tail.append(data)
            if log.isEnabledFor(logging.DEBUG):
                # The guest writes there at will: a few quoted lines a minute, not all of it.
                left_out = self._stderr_log.allow("guest stderr", time.monotonic())
                if left_out is not None:
                    more = f" ({left_out} reads left out)" if left_out else ""
                    log.debug("guest stderr: %s%s", quote(data.decode("utf-8", "replace").rstrip(), 1000), more)

    # -- death ---------------------------------------------------------------------------------

    def _die(self, reason: str | None, exc: BaseException | None = None, fatal: bool = False) -> None:
        if not self._died_once.acquire(blocking=False):
            return
        self.dead = True
        self._outq.put(None)
        if fatal or reason is not None:
            # On a thread of its own: a frozen agent never answers the signal request, and
            # this thread must still report the death.
            threading.Thread(target=self._kill_quietly, name="guest-kill", daemon=True).start()
        if reason is None:
            reason = self._exit_reason(exc)
        if not self.ready.done():
            self.ready.set_exception(GuestDied(reason))
        self.loop.call_soon_threadsafe(self._died_on_loop, reason)

    def _kill_quietly(self) -> None:
        try:
            self.handle.child.signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - gone already
            pass

    def _exit_reason(self, exc: BaseException | None) -> str:
        if self.closing:
            return "the session was shut down"
        parts = []
        if exc is not None:
            parts.append(f"{type(exc).__name__}: {exc}")
        status = None
        try:
            status = self.handle.child.wait(timeout=5)
        except Exception as e:  # noqa: BLE001
            if exc is None:
                parts.append(f"{type(e).__name__}: {e}")
        if status is not None:
            code = getattr(status, "exit_code", None)
            sig = getattr(status, "signal", None)
            if sig:
                parts.append(f"the Python process in the guest was killed by {_signal_name(sig)}")
            elif code is not None:
                parts.append(f"the Python process in the guest exited with code {code}")
            rss = getattr(status, "peak_rss_kib", None)
            if sig == signal.SIGKILL and rss:
                parts.append(f"peak memory {rss // 1024} MiB: out of memory?")
        tail = b"".join(self.stderr_tail).decode("utf-8", "replace").strip().splitlines()[-5:]
        if tail:  # the guest writes these: at most 1000 characters of them reach the reason
            parts.append("last guest diagnostics: " + " | ".join(tail)[-1000:])
        return "; ".join(parts) or "the guest REPL stopped without saying why"

    def _died_on_loop(self, reason: str) -> None:
        err = GuestDied(reason)
        for _, fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self.client._on_link_died(self, reason)

    def close(self) -> None:
        self.closing = True
        self.send({"type": "shutdown"})
        self._outq.put(None)
        try:
            self.handle.release()
        except Exception:  # noqa: BLE001
            log.exception("releasing the guest failed")


class GuestRepl:
    """Starts the guest REPL via a backend and talks to it; restarts it when it dies."""

    def __init__(
        self,
        backend: Backend,
        loop: asyncio.AbstractEventLoop,
        on_event: EventCallback,
        *,
        env: dict[str, str],
        startup_timeout: float = 120.0,
        driver: bytes | None = None,
        frame_timeout: float = 30.0,
        ping_interval: float = 5.0,
        ping_timeout: float = 15.0,
    ) -> None:
        self.backend = backend
        self.loop = loop
        self.on_event = on_event
        self.env = env
        self.startup_timeout = startup_timeout
        #: Seconds a frame the guest started may take to complete (0: no limit).
        self.frame_timeout = frame_timeout
        #: Liveness: ping the VM's agent this often while a request waits (0: never) ...
        self.ping_interval = ping_interval
        #: ... and reset the guest when a ping is not answered within this many seconds.
        self.ping_timeout = ping_timeout
        self._resetting = False
        self.info: GuestInfo | None = None
        self.restarts = 0
        self.last_start_seconds: float | None = None
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._starting: concurrent.futures.Future[_Link] | None = None
        self._shutting_down = False
        self._driver = driver if driver is not None else driver_source()
        #: Idle suspend (machine/idle.py:IdleSuspender), or None: told of every request and
        #: guest event (`touch()`), awaited before every request (`before_use()`: resumes a
        #: suspended guest), told when %restore replaced the guest (`superseded()`).
        self.gate: Any = None
        #: Called with each guest handle that becomes this client's guest (a launch: first
        #: start, restart after a death, pool hand-out; an adoption: %restore, restore-ahead),
        #: on a worker thread (blocking calls allowed), after its "ready" and before any request
        #: reaches it. Each returns frames to send to the guest REPL first (requests without an
        #: id: no reply). A hook that raises is logged and skipped.
        self.attach_hooks: list[Callable[[GuestHandle], list[dict[str, Any]]]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> concurrent.futures.Future:
        """Launch a guest in the background (no-op while one is starting or alive)."""
        if self._starting is not None and not self._starting.done():
            return self._starting
        if self._link is not None and not self._link.dead:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(self._link)
            return done
        self._shutting_down = False
        fut: concurrent.futures.Future[_Link] = concurrent.futures.Future()
        self._starting = fut
        threading.Thread(target=self._launch, args=(fut,), name="guest-launch", daemon=True).start()
        return fut

    def _launch(self, fut: concurrent.futures.Future,
                make_handle: Callable[[], GuestHandle] | None = None) -> None:
        t0 = time.monotonic()
        try:
            handle = make_handle() if make_handle is not None else \
                self.backend.launch(self._driver, self.env)
        except Exception as e:  # noqa: BLE001
            log.exception("launching the guest failed")
            fut.set_exception(GuestUnavailable(f"could not start the guest ({self.backend.name} "
                                               f"backend): {type(e).__name__}: {e}"))
            return
        link = _Link(self, handle)
        self._link = link
        link.start()
        if getattr(handle, "prestarted", False) and not getattr(handle, "greeted", False):
            # The REPL was started ahead of time (warm spare, restored snapshot) and its first
            # "ready" was consumed then: ask it to introduce itself again (unless whoever
            # started it did so already and left the answer unread: `greeted`).
            link.send({"type": "hello"})
        try:
            info = link.ready.result(timeout=self.startup_timeout)
        except concurrent.futures.TimeoutError:
            link._die(f"the guest REPL did not answer within {self.startup_timeout:.0f} s",
                      fatal=True)
            fut.set_exception(GuestUnavailable(
                f"the guest REPL did not start within {self.startup_timeout:.0f} s "
                f"(raise c.MicroVMKernel.startup_timeout if the VM is just slow)"))
            return
        except GuestDied as e:
            fut.set_exception(GuestUnavailable(f"the guest REPL died while starting: {e.reason}"))
            return
        self._run_attach_hooks(link)
        self.last_start_seconds = time.monotonic() - t0
        log.info("guest ready in %.3f s on %s (%s)", self.last_start_seconds, info.where,
                 info.executor)
        fut.set_result(link)
        prepare = getattr(self.backend, "prepare_spare", None)
        if prepare is not None and not self._shutting_down:
            try:
                prepare()  # the next guest starts now, off the critical path
            except Exception:  # noqa: BLE001
                log.exception("preparing a spare guest failed")

    def _run_attach_hooks(self, link: _Link) -> None:
        for hook in list(self.attach_hooks):
            try:
                for frame in hook(link.handle):
                    link.send(frame)
            except Exception:  # noqa: BLE001 - the guest still runs, without what the hook adds
                log.exception("a guest attach hook failed")

    def starting_future(self) -> concurrent.futures.Future | None:
        """The current start attempt, if any (read-only; safe from any thread)."""
        return self._starting

    async def wait_ready(self, timeout: float | None = None) -> GuestInfo:
        """The running guest's info, starting one if needed (resuming it if it is suspended).
        Raises GuestUnavailable, or GuestDied if a suspended guest could not be resumed."""
        if self.gate is not None:
            await self.gate.before_use()
        fut = self.start()
        if fut.done() and fut.exception() is None:
            # The usual case, once per request: a done concurrent future handed to asyncio
            # still costs a wake-up of the loop through its self-pipe and one more iteration.
            link = fut.result()
        else:
            try:
                link = await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
            except asyncio.TimeoutError:
                raise GuestUnavailable("the guest is still starting") from None
        info = link.ready.result()
        return info

    def _on_ready(self, link: _Link, info: GuestInfo) -> None:
        if link is self._link:
            self.info = info

    def _on_link_died(self, link: _Link, reason: str) -> None:
        if link is not self._link:
            return
        self._link = None
        if link.closing or self._shutting_down:
            return
        log.warning("guest died: %s", reason)
        threading.Thread(target=link.handle.release, name="guest-release", daemon=True).start()
        self.on_event("died", {"reason": reason}, [])
        if link.was_ready:  # a guest that dies while starting is not retried in a loop
            self.restarts += 1
            self.start()

    async def stop_guest(self) -> None:
        """Release the running guest without starting another (idle suspend: machine/idle.py;
        the next `wait_ready` resumes or starts one)."""
        await self._stop()

    async def restart(self) -> GuestInfo:
        """A fresh guest (the old one is released)."""
        await self._stop()
        self._shutting_down = False
        return await self.wait_ready()

    async def shutdown(self) -> None:
        self._shutting_down = True
        # Close the backend first: a pool that is shut down destroys the VM given back to it
        # instead of restoring a replacement nobody will use.
        await asyncio.to_thread(self.backend.close)
        await self._stop()

    def close_now(self) -> None:
        """Release the guest at once on the calling thread, without the loop: the process is
        exiting (an exit function, SIGTERM). The backend closes first, as in `shutdown`."""
        self.backend.close()
        link = self._link
        if link is not None:
            link.closing = True
            link.close()

    async def _stop(self) -> None:
        starting = self._starting
        if starting is not None and not starting.done():
            try:
                await asyncio.wrap_future(starting)
            except Exception:  # noqa: BLE001
                pass
        link, self._link = self._link, None
        if link is not None:
            link.closing = True
            err = GuestDied("the session was restarted")
            for _, fut in link.pending.values():
                if not fut.done():
                    fut.set_exception(err)
            link.pending.clear()
            await asyncio.to_thread(link.close)

    # -- messages --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """A guest is running, or suspended while idle (the next request resumes it)."""
        if self.gate is not None and self.gate.suspended:
            return True
        return self._link is not None and not self._link.dead and self._link.ready.done()

    @property
    def busy(self) -> bool:
        """A guest is starting, or a request to it awaits its reply."""
        starting = self._starting
        link = self._link
        return (starting is not None and not starting.done()) or \
            (link is not None and bool(link.pending))

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a request and await its validated reply content (must run on `loop`)."""
        await self.wait_ready()
        link = self._link
        if link is None or link.dead:
            raise GuestDied("the guest is not running")
        rid = next(self._ids)
        fut = self.loop.create_future()
        link.pending[rid] = (kind, fut)
        link.send(dict(fields, type=kind, id=rid))
        self._watch(link)
        return await fut

    def notify(self, kind: str, **fields: Any) -> bool:
        """Send a message that has no reply (input replies). Thread-safe."""
        link = self._link
        if link is None or link.dead:
            return False
        if self.gate is not None:
            self.gate.touch()
        link.send(dict(fields, type=kind))
        return True

    def pending_ids(self) -> set[int]:
        """Ids of the requests that await the current guest's reply (on the loop)."""
        link = self._link
        return set(link.pending) if link is not None else set()

    # -- stuck guests: liveness, reset -------------------------------------------------------

    def _watch(self, link: _Link) -> None:
        """Starts the liveness watchdog of `link` unless it runs (only for guests whose handle
        can ping, i.e. VMs)."""
        if self.ping_interval <= 0 or getattr(link.handle, "ping", None) is None:
            return
        if link.watchdog is None or link.watchdog.done():
            link.watchdog = self.loop.create_task(self._watchdog(link))

    async def _watchdog(self, link: _Link) -> None:
        """While `link` has pending requests: a ping to its agent every `ping_interval` s; one
        not answered within `ping_timeout` s resets the guest (its VM is replaced)."""
        while True:
            await asyncio.sleep(self.ping_interval)
            if link is not self._link or link.dead or not link.pending:
                return
            try:
                await asyncio.to_thread(link.handle.ping, self.ping_timeout)  # type: ignore[attr-defined]
            except TimeoutError:
                if link is self._link and not link.dead:
                    await self.reset(f"the microVM stopped answering (its agent did not answer "
                                     f"within {self.ping_timeout:g} s)", keep_vm=False)
                return
            except Exception:  # noqa: BLE001 - the VM died: the reader reports that
                return

    def _on_stuck(self, link: _Link, why: str) -> None:
        """On the loop: `link`'s reader gave up on it (see `_Link._read_loop`)."""
        if link is self._link and not link.dead and not link.closing:
            self.loop.create_task(self.reset(why))

    async def reset(self, why: str, *, keep_vm: bool = True) -> str:
        """Ends the current guest, which is stuck because `why` (a sentence fragment, e.g. "the
        interrupt was ignored for 5 s"): kills the REPL's process group and starts a fresh REPL
        in the same VM, or, when that fails or `keep_vm` is false, destroys the VM and launches
        a fresh guest. Pending requests fail with `GuestStuck(message)`; returns the message
        ("" when there was nothing to reset). Runs on the loop; the new guest starts in the
        background (requests wait for it)."""
        link = self._link
        if link is None or link.dead or link.closing or self._resetting or self._shutting_down:
            return ""
        self._resetting = True
        try:
            link.closing = True  # its death and late frames are no longer this client's
            pending, link.pending = link.pending, {}
            self._link = None
            fut: concurrent.futures.Future[_Link] = concurrent.futures.Future()
            self._starting = fut
            make, step = await asyncio.to_thread(self._end_stuck, link, keep_vm)
        finally:
            self._resetting = False
        message = f"{why}; {step}"
        log.warning("stuck guest reset: %s", message)
        threading.Thread(target=self._launch, args=(fut, make), name="guest-launch",
                         daemon=True).start()
        err = GuestStuck(message)
        for _, request_future in pending.values():
            if not request_future.done():
                request_future.set_exception(err)
        if not pending:  # nothing waited: tell whoever watches
            self.on_event("died", {"reason": message}, [])
        self.restarts += 1
        return message

    def _end_stuck(self, link: _Link, keep_vm: bool
                   ) -> tuple[Callable[[], GuestHandle] | None, str]:
        """Worker thread, for `reset`: kills the stuck REPL. Returns how to start the next guest
        (None: a fresh launch) and the step taken, as the user reads it."""
        handle = link.handle
        failed = ""
        if keep_vm:
            try:
                kill_repl = getattr(handle, "kill_repl", None)
                if kill_repl is not None:  # VMs: bounded, through the agent
                    kill_repl(self.ping_timeout)
                else:  # a host process group
                    handle.child.kill()  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - the VM is replaced instead
                log.warning("killing the stuck guest REPL failed: %s: %s", type(e).__name__, e)
                failed = "killing the Python process failed, so "
            else:
                respawn = getattr(self.backend, "respawn", None)
                if respawn is not None:
                    return (lambda: respawn(handle, self._driver, self.env),
                            "the Python process was killed (with every process it started) and "
                            "a fresh one started in the same microVM: variables are lost, files "
                            "(/workspace, /tmp, ...) are kept.")
                if not getattr(self.backend, "isolated", True):  # a host process: files stay
                    threading.Thread(target=handle.release, name="guest-release",
                                     daemon=True).start()
                    return (None, "the Python process was killed and a fresh one started: "
                            "variables are lost, files are kept.")
        destroy = getattr(handle, "destroy", None)
        threading.Thread(target=destroy if destroy is not None else handle.release,
                         name="guest-release", daemon=True).start()
        return (None, f"{failed}the microVM was replaced by a fresh one: variables, files and "
                "processes in it are lost; your snapshots are kept.")

    def interrupt(self) -> bool:
        """SIGINT to the guest REPL (blocking; call from a worker thread)."""
        link = self._link
        if link is None or link.dead:
            return False
        try:
            link.handle.child.signal(signal.SIGINT)
        except Exception:  # noqa: BLE001
            log.exception("interrupting the guest failed")
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the guest REPL, as if it crashed (tests; a stuck guest)."""
        link = self._link
        if link is not None:
            link.handle.child.signal(signal.SIGKILL)

    # -- adopting a guest started elsewhere (%restore: machine/current.py) --------------------

    @property
    def handle(self) -> GuestHandle | None:
        """The running guest's handle (None while none runs)."""
        link = self._link
        return None if link is None or link.dead else link.handle

    async def adopt(self, handle: GuestHandle, timeout: float | None = None) -> GuestInfo:
        """Make `handle` — a REPL that is already running, e.g. in a VM restored from a snapshot —
        this client's guest: say hello, wait for its ready, then release the previous guest (in
        the background). If it does not answer, it is released and the previous guest stays."""
        if self._shutting_down:
            raise GuestUnavailable("the session is shutting down")
        starting = self._starting
        if starting is not None and not starting.done():
            try:
                await asyncio.wrap_future(starting)
            except Exception:  # noqa: BLE001 - replacing it anyway
                pass
        link = _Link(self, handle)  # its events are dropped until it becomes self._link
        link.start()
        link.send({"type": "hello"})
        try:
            info = await asyncio.wait_for(asyncio.wrap_future(link.ready),
                                          timeout or self.startup_timeout)
        except BaseException:
            link.closing = True
            threading.Thread(target=link.close, name="guest-release", daemon=True).start()
            raise
        if self.attach_hooks:
            await asyncio.to_thread(self._run_attach_hooks, link)
        old, self._link = self._link, link
        self.info = info
        if self.gate is not None:
            self.gate.superseded()
        if old is not None:
            old.closing = True
            threading.Thread(target=old.close, name="guest-release", daemon=True).start()
        return info
