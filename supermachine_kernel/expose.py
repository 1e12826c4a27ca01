"""Exposed ports: a TCP port inside the guest, reachable from the host on 127.0.0.1 (issue 13
part 3; ``Vm.expose_tcp`` in api.py and the ``%expose`` magic use this).

How a connection travels. The guest has no network device; everything crosses the agent's
framed channel. The host listens on 127.0.0.1 only.

Native channel (agents whose Welcome lists the ``tcp`` feature, i.e. images and snapshots
made since it exists): each accepted connection becomes a TCP channel of the agent
(``Vm.tcp_relay``: ``TcpConnect`` to 127.0.0.1:<port> in the guest, then two Rust threads copy
bytes with credit windows both ways; runtime ``tcp`` module). No guest process is started.

Relay process (older agents, or ``NATIVE = False``): for each accepted connection the host
spawns a small relay process in the guest (``python3 -I -S -c GUEST_RELAY <port>``, through the agent's
ordinary Spawn) that connects to 127.0.0.1:<port> inside the guest; host → guest bytes travel
as that process's stdin, guest → host bytes as its stdout. So the relay rides on what the
agent and runtime already enforce:

* back-pressure both ways: the stdin window (``STDIN_WINDOW``, ``write_stdin`` blocks) and the
  output credit window (``DEFAULT_OUTPUT_WINDOW``; the runtime credits only what this module
  has taken with ``read_stdout``), so a guest that floods buffers at most one window per
  connection on the host;
* hostile bytes are just payload: nothing here parses what the guest sends;
* no agent or protocol change, so every existing image and snapshot can expose ports.

The price is one guest process start per connection (a Python interpreter without site:
~270 ms of guest CPU under TCG), and the guest image needs ``python3``; the native channel
has neither (docs/issue13-expose.md).

Rules this module keeps:

* at most ``MAX_CONNECTIONS`` relayed connections at once per VM (the ``Slots`` are shared by
  every exposure of one ``Vm``); a connection over the cap is accepted and closed at once,
  with a log line;
* a guest port with nothing listening: the guest relay exits with ``REFUSED_EXIT``; the host
  client sees a clean close (EOF) and the log says why;
* ``stop()`` closes the listener only; connections in flight keep working until either side
  closes. ``close()`` also ends the connections in flight (used when the VM is given back).
* the relay follows ``vm_source()`` for every new connection, so an exposure made by
  ``%expose`` reaches the kernel's current VM, also after ``%restore``.
* (relay processes only) one spare guest relay per exposure is started ahead, waiting for its go byte (``G``), so a
  connection after an idle moment does not wait for an interpreter to start. It is started
  when the last open connection ends (in a burst it would compete with the next connection's
  relay for the guest's CPU), and a connection waits for a spare being started rather than
  start a second relay beside it.
* a guest that stays silent after the host client closed its side holds the connection at
  most ``HALF_CLOSED_IDLE`` seconds (at once after a reset of the host client).
  A spare that is not used within ``SPARE_WAIT`` seconds exits by itself (so one caught in a
  snapshot does not linger in its restores); a spare of another VM than ``vm_source()``'s, or
  one that exited, is replaced by a fresh start.
"""
from __future__ import annotations

import logging
import select
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("supermachine_kernel.expose")

#: Default cap on relayed connections open at once, per VM.
MAX_CONNECTIONS = 32
#: Exit code of the guest relay when nothing accepts on the guest port.
REFUSED_EXIT = 3
#: Bytes moved per read.
CHUNK = 64 * 1024
#: Seconds a connection may stay silent from the guest after the host client closed its side;
#: then it ends (a relay that never finishes must not hold a slot for ever).
HALF_CLOSED_IDLE = 120.0
#: How often the guest → host loop wakes up to check that.
POLL = 2.0

#: Use the agent's native TCP channel when the VM's agent has it (see the module doc).
NATIVE = True
#: Start a spare guest relay ahead of each connection (see the module doc).
SPARE = True
#: Seconds a spare guest relay waits for its connection before it exits.
SPARE_WAIT = 300
#: The guest side of one connection: wait (at most argv[2] seconds) for the go byte ``G`` on
#: stdin, connect to 127.0.0.1:argv[1]; stdin → socket, socket → stdout; EOF on stdin
#: half-closes the socket; the process exits when the guest server closes.
GUEST_RELAY = r"""
import os, select, socket, sys, threading
port = int(sys.argv[1])
if not select.select([0], [], [], float(sys.argv[2]))[0] or os.read(0, 1) != b"G":
    sys.exit(0)
try:
    s = socket.create_connection(("127.0.0.1", port))
except OSError as e:
    sys.stderr.write("connect to 127.0.0.1:%d in the guest failed: %s\n" % (port, e))
    sys.exit(3)
def up():
    try:
        while True:
            b = os.read(0, 65536)
            if not b:
                break
            s.sendall(b)
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        v = memoryview(b)
        while v:
            v = v[os.write(1, v):]
except OSError:
    pass
os._exit(0)
"""


class Slots:
    """The connection cap of one VM: a counter that refuses instead of waiting."""

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        if limit < 1:
            raise ValueError("max_connections must be at least 1")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used -= 1


def _native(vm: Any) -> bool:
    """Whether connections to ``vm`` go through the agent's native TCP channel."""
    if not NATIVE:
        return False
    try:
        return bool(vm.tcp_channels)
    except Exception:  # noqa: BLE001 - released, or a stand-in without the property
        return False


def _check_port(port: int, what: str, allow_zero: bool) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{what} must be an int, not {type(port).__name__}")
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{what} must be in 1..65535{' (or 0: any free port)' if allow_zero else ''}, not {port}")
    return port


class Exposure:
    """One guest port exposed on 127.0.0.1:``host_port``. ``url`` is ``http://127.0.0.1:PORT/``.
    ``stop()`` closes the listener (connections in flight go on); ``close()`` also ends them."""

    def __init__(self, vm_source: Callable[[], Any], guest_port: int, host_port: int = 0,
                 slots: Optional[Slots] = None, on_close: Optional[Callable[["Exposure"], None]] = None) -> None:
        self.guest_port = _check_port(guest_port, "guest_port", allow_zero=False)
        _check_port(host_port, "host_port", allow_zero=True)
        self._vm_source = vm_source
        self._slots = slots or Slots()
        self._on_close = on_close
        self._lock = threading.Lock()
        self._relays: set[_Relay] = set()
        self._spare: Optional[tuple[Any, Any]] = None  # (vm, child) started ahead
        self._refilling = False  # a spare is being spawned
        self._spare_ready = threading.Condition(self._lock)
        self._stopped = False
        self.connections_total = 0
        self.refused_total = 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", host_port))
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on 127.0.0.1:{host_port} for guest port "
                          f"{guest_port}: {e.strerror}; pick another host port, or 0 for any free one") from e
        self._sock = sock
        self.host_port: int = sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                         name=f"expose-{self.host_port}-{guest_port}")
        self._thread.start()
        log.info("exposing guest port %d on 127.0.0.1:%d", guest_port, self.host_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}/"

    @property
    def listening(self) -> bool:
        return not self._stopped

    @property
    def active(self) -> int:
        """Connections relayed right now."""
        with self._lock:
            return len(self._relays)

    def __repr__(self) -> str:
        state = "listening" if self.listening else "stopped"
        return f"<Exposure guest:{self.guest_port} -> {self.url} {state}, {self.active} open>"

    def stop(self) -> None:
        """Closes the listener: new connections are refused by the host. Connections in flight
        keep working until either side closes them. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        if self._on_close is not None:
            self._on_close(self)

    def close(self) -> None:
        """``stop()``, and ends every connection in flight (their guest relays are killed)."""
        self.stop()
        with self._lock:
            relays = list(self._relays)
        for r in relays:
            r.abort()

    def __enter__(self) -> "Exposure":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn_relay(self, vm: Any) -> Any:
        return vm.spawn(["python3", "-I", "-S", "-c", GUEST_RELAY, str(self.guest_port), str(SPARE_WAIT)])

    def refill(self) -> None:
        """Starts the spare guest relay, if there is none (nor one being started) and the
        listener is open."""
        with self._spare_ready:
            if self._stopped or self._spare is not None or self._refilling or not SPARE:
                return
            self._refilling = True
        child = vm = None
        try:
            vm = self._vm_source()
            if _native(vm):
                vm = None  # no guest process to start ahead
            else:
                child = self._spawn_relay(vm)
        except Exception as e:  # noqa: BLE001 - no VM right now: the next connection retries
            log.debug("expose %d: no spare relay: %s", self.host_port, e)
        with self._spare_ready:
            self._refilling = False
            if child is not None and self._spare is None and not self._stopped:
                self._spare, child = (vm, child), None
            self._spare_ready.notify_all()
        if child is not None:
            _kill(child)

    def take_relay(self) -> Any:
        """A started guest relay for a new connection (the spare, else a fresh one), already
        told to connect (the next spare: see ``_done``). A spare being started is waited for
        rather than a second relay started beside it."""
        vm = self._vm_source()
        with self._spare_ready:
            self._spare_ready.wait_for(lambda: not self._refilling, timeout=30)
            spare, self._spare = self._spare, None
        child = None
        if spare is not None:
            if spare[0] is vm and spare[1].poll() is None:
                child = spare[1]
            else:
                _kill(spare[1])
        if child is None:
            child = self._spawn_relay(vm)
        try:
            child.write_stdin(b"G")
        except Exception:
            _kill(child)
            raise
        return child

    def _drop_spare(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            _kill(spare[1])

    def _accept_loop(self) -> None:
        # The first spare starts beside the loop: a slow guest must not delay accepting.
        threading.Thread(target=self.refill, daemon=True, name=f"expose-spare-{self.host_port}").start()
        try:
            while True:
                ready, _, _ = select.select([self._sock, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                try:
                    conn, peer = self._sock.accept()
                except OSError as e:
                    log.warning("expose %d: accept failed: %s", self.host_port, e)
                    continue
                self._admit(conn)
        finally:
            self._drop_spare()
            self._sock.close()
            self._wake_r.close()
            self._wake_w.close()
            log.info("stopped listening on 127.0.0.1:%d (guest port %d)", self.host_port, self.guest_port)

    def _admit(self, conn: socket.socket) -> None:
        if not self._slots.take():
            self.refused_total += 1
            log.warning("expose %d -> guest %d: %d connections open already (the cap per VM); "
                        "closing a new one", self.host_port, self.guest_port, self._slots.limit)
            conn.close()
            return
        relay = _Relay(self, conn)
        with self._lock:
            self._relays.add(relay)
            self.connections_total += 1
        try:
            threading.Thread(target=relay.run, daemon=True, name=f"expose-conn-{self.host_port}").start()
        except RuntimeError as e:
            log.warning("expose %d: cannot start a relay thread: %s", self.host_port, e)
            relay.finish()

    def _done(self, relay: "_Relay") -> None:
        with self._lock:
            self._relays.discard(relay)
            idle = not self._relays
        self._slots.give()
        if idle:  # in a burst, a spare starting now would compete with the next connection's relay
            self.refill()


class _Relay:
    """One host connection and its guest relay process."""

    def __init__(self, exposure: Exposure, conn: socket.socket) -> None:
        self.x = exposure
        self.conn = conn
        self.child: Any = None
        #: The native relay (``_core.TcpRelay``), when the agent has TCP channels.
        self.native: Any = None
        #: When the host client's side ended (EOF or error), and whether it was an error.
        self.host_done: Optional[float] = None
        self.host_failed = False
        self._finished = False
        self._aborted = False
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # noqa: BLE001 - one connection's failure must not reach anyone else
            log.exception("expose %d: relay failed", self.x.host_port)
        finally:
            self.finish()

    def _run(self) -> None:
        x = self.x
        try:
            vm = x._vm_source()
        except Exception as e:  # noqa: BLE001 - no VM right now
            log.warning("expose %d -> guest %d: no VM to connect to: %s", x.host_port, x.guest_port, e)
            return
        if _native(vm):
            self._run_native(vm)
            return
        try:
            self.child = x.take_relay()
        except Exception as e:  # noqa: BLE001 - the VM may be gone, released, or have no python3
            log.warning("expose %d -> guest %d: cannot start the guest relay: %s", x.host_port, x.guest_port, e)
            return
        up = threading.Thread(target=self._host_to_guest, daemon=True, name=f"expose-up-{x.host_port}")
        up.start()
        if not self._guest_to_host():
            return  # the host client went away or the VM ended: finish() kills the guest relay
        status = self._exit_status()
        if status is not None and status.exit_code == REFUSED_EXIT:
            why = self._stderr().strip() or f"nothing listens on guest port {x.guest_port}"
            log.warning("expose %d: %s; closed the host connection", x.host_port, why)

    def _run_native(self, vm: Any) -> None:
        x = self.x
        try:
            relay = vm.tcp_relay(x.guest_port, self.conn, half_closed_idle=HALF_CLOSED_IDLE)
        except Exception as e:  # noqa: BLE001 - nothing listens there, or the VM is gone
            log.warning("expose %d: %s; closed the host connection", x.host_port, e)
            return
        with self._lock:
            aborted, self.native = self._aborted, relay
        if aborted:
            relay.close()
        relay.wait()

    def _host_to_guest(self) -> None:
        child = self.child
        try:
            while True:
                data = self.conn.recv(CHUNK)
                if not data:
                    break
                child.write_stdin(data)
        except Exception:  # noqa: BLE001 - host client reset, or the guest relay ended
            self.host_failed = True
        self.host_done = time.monotonic()
        try:
            child.close_stdin()
        except Exception:  # noqa: BLE001
            pass

    def _guest_to_host(self) -> bool:
        """Guest output to the host client; True when the guest relay's stdout reached EOF."""
        child = self.child
        last = time.monotonic()
        while True:
            try:
                data = child.read_stdout(CHUNK, timeout=POLL)
            except TimeoutError:
                if self.host_failed:
                    return False
                done = self.host_done
                if done is not None and time.monotonic() - max(done, last) > HALF_CLOSED_IDLE:
                    log.info("expose %d: the host client closed its side and the guest sent nothing "
                             "for %.0f s; closing the connection", self.x.host_port, HALF_CLOSED_IDLE)
                    return False
                continue
            except Exception as e:  # noqa: BLE001 - the VM died or was released
                log.info("expose %d: guest side ended: %s", self.x.host_port, e)
                return False
            if not data:
                return True
            last = time.monotonic()
            try:
                self.conn.sendall(data)
            except OSError:
                return False

    def _exit_status(self) -> Any:
        try:
            return self.child.wait(timeout=10)
        except Exception:  # noqa: BLE001
            return None

    def _stderr(self) -> str:
        try:
            return self.child.read_stderr(4096, timeout=1).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            return ""

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.native is not None:
            self.native.close()
        self._kill()

    def _kill(self) -> None:
        if self.child is not None:
            _kill(self.child)

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        self._kill()
        self.x._done(self)


def _kill(child: Any) -> None:
    """Kills a guest relay process if it still runs."""
    try:
        if child.poll() is None:
            child.signal(signal.SIGKILL)
    except Exception:  # noqa: BLE001 - gone already, or its VM is
        pass
