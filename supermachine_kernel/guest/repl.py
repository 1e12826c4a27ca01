"""Guest REPL driver: runs user code inside the VM and speaks framed JSON with the host session.

Runs on the guest's python3 (stdlib only; IPython and `comm` are used when the image has them).
Started by the host as `python3 -u repl.py`; the host owns the other end of its stdin/stdout.

Wire format, both directions: a 4-byte big-endian length, then that many bytes of UTF-8 JSON
holding one object with a "type" key. Binary payloads (PNG, comm buffers) travel as base64.
Stream text from the guest travels raw instead: a length with its top bit set (RAW_STREAM)
announces a body of one byte (1 = stdout, 2 = stderr) followed by the text in UTF-8.

    host -> guest: execute, complete, inspect, is_complete, history, comm_info, comm_open,
                   comm_msg, comm_close, input_reply, hello, workspace, network, shutdown (requests
                   with an "id" are answered with a reply once their output has been sent)
    guest -> host: ready, reply {id, content}, stream, display_data, update_display_data,
                   execute_result, clear_output, error, input_request, comm_open, comm_msg,
                   comm_close

File descriptors: the protocol keeps private duplicates of fds 0 and 1. fd 0 becomes /dev/null,
fds 1 and 2 become pipes that threads drain into `stream` messages, so output of subprocesses
and C extensions streams to the notebook while the cell runs. `sys.stdout`/`sys.stderr` are text
objects feeding the same buffers, so Python prints and fd writes stay in order per stream.

Threads: the main thread runs requests one at a time (user code, widget callbacks); a reader
thread parses host frames (input replies bypass the queue); a writer thread owns the protocol fd;
a flusher sends buffered output every 50 ms. SIGINT (sent by the host for an interrupt) raises
KeyboardInterrupt only while user code runs; between requests it is ignored.
"""
import ast
import base64
import builtins
import codeop
import collections
import contextlib
import datetime
import fcntl
import fnmatch
import inspect
import io
import json
import os
import platform
import queue
import re
import select
import signal
import struct
import sys
import threading
import time
import traceback

HEADER = struct.Struct(">I")
MAX_FRAME = 32 * 1024 * 1024
RAW_STREAM = 0x80000000  # header flag: a raw stream frame (see the module doc)
STREAM_IDS = {"stdout": b"\x01", "stderr": b"\x02"}
STREAM_CHUNK = 1024 * 1024  # most characters of stream text per frame
MAX_QUEUED = 4 * 1024 * 1024  # bytes of frames waiting for the writer before senders block
MAX_PIECES = 512  # buffers per writev (IOV_MAX is 1024)
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python >= 3.10 names it)
PIPE_SIZE = 1024 * 1024
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
HISTORY_OUTPUT_CAP = 1024 * 1024  # characters per stream and cell IPython's history records
FLUSH_INTERVAL = 0.05
WARM_UP_GRACE = 0.05  # seconds a host that just attached has to send its first request
GENERATION_FILE = "/run/supermachine/generation"
NOTIFY_HELLO_ENV = "SUPERMACHINE_NOTIFY_HELLO"  # the agent signals us after every Hello

# ---------------------------------------------------------------------------------------------
# Protocol channel


def _json_default(obj):
    """JSON fallback for values user code hands to display/comm APIs (like jupyter's json_clean)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    for attr in ("tolist", "item"):  # numpy arrays and scalars
        method = getattr(obj, attr, None)
        if callable(method):
            try:
                return method()
            except Exception:
                pass
    return repr(obj)


# One encoder for every frame (json.dumps with `default=` builds a new one per call).
_ENCODER = json.JSONEncoder(default=_json_default)
_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(text):
    """`text` as UTF-8; a lone surrogate (a file name decoded with surrogateescape, say) shows
    as U+FFFD instead of failing the whole write."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")


def _write_all(fd, pieces):
    """Writes every buffer in `pieces`, in order, with as few system calls as the fd allows."""
    while pieces:
        n = os.writev(fd, pieces)
        done = 0
        while done < len(pieces) and n >= len(pieces[done]):
            n -= len(pieces[done])
            done += 1
        pieces = pieces[done:]
        if n:
            pieces[0] = memoryview(pieces[0])[n:]


class Channel:
    """Frames in from the host, frames out to it. `send` is safe from any thread.

    Outgoing frames wait in a queue of at most MAX_QUEUED bytes (one larger frame may pass
    alone): a sender blocks while the writer is that far behind, so a flood of output waits for
    the host instead of filling guest memory."""

    def __init__(self, rfd, wfd):
        self._rfd = rfd
        self._wfd = wfd
        self._out: collections.deque[tuple[bytes, ...]] = collections.deque()  # frames
        self._queued = 0  # bytes in _out plus the batch being written
        self._held = None  # a frame kept back by send(hold=True)
        self._cond = threading.Condition(threading.Lock())
        self.requests: queue.SimpleQueue[dict | None] = queue.SimpleQueue()  # None: host gone
        self.input_replies: queue.SimpleQueue[dict] = queue.SimpleQueue()
        try:  # fewer, larger writes and reads between us and the agent
            fcntl.fcntl(wfd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        threading.Thread(target=self._write_loop, name="repl-writer", daemon=True).start()

    def start_reading(self):
        threading.Thread(target=self._read_loop, name="repl-reader", daemon=True).start()

    def send(self, msg, hold=False):
        """Queues one JSON frame for the host. With hold=True it is kept back until the next
        send (or the flusher's next tick, FLUSH_INTERVAL at most), so a cell's result leaves
        in one write with the reply that follows it: under TCG every write wakes the agent and
        crosses virtio-serial, and the host handles each separately (a `1+1` cell: ~1 ms less)."""
        data = _ENCODER.encode(msg).encode("utf-8")
        if len(data) > MAX_FRAME:
            raise ValueError(
                "output of %d bytes is larger than the %d-byte message limit" % (len(data), MAX_FRAME)
            )
        self._put((HEADER.pack(len(data)), data), len(data) + HEADER.size, hold)

    def send_stream(self, name, data):
        """Queues stream text (`name` "stdout" or "stderr"; `data` UTF-8 of at most
        STREAM_CHUNK characters) as a raw stream frame: no JSON, whose encoder under TCG cost
        more than everything else on the way out (~40 ms per MB)."""
        self._put((HEADER.pack(RAW_STREAM | (len(data) + 1)) + STREAM_IDS[name], data),
                  len(data) + HEADER.size + 1)

    def _put(self, frame, size, hold=False):
        with self._cond:
            while self._queued and self._queued + size > MAX_QUEUED:
                self._cond.wait()
            held, self._held = self._held, None
            if held is not None:
                self._enqueue(*held)
            if hold:
                self._held = (frame, size)
            else:
                self._enqueue(frame, size)

    def _enqueue(self, frame, size):
        self._out.append(frame)
        self._queued += size
        self._cond.notify_all()

    def release_held(self):
        with self._cond:
            held, self._held = self._held, None
            if held is not None:
                self._enqueue(*held)

    def _write_loop(self):
        while True:
            # Frames queued meanwhile (a result and its reply) leave in one write: every write
            # wakes the agent and crosses virtio-serial once, which under TCG costs more than
            # anything else per frame.
            pieces: list[bytes] = []
            size = 0
            with self._cond:
                while not self._out:
                    self._cond.wait()
                while self._out and size < STREAM_CHUNK and len(pieces) < MAX_PIECES:
                    frame = self._out.popleft()
                    pieces.extend(frame)
                    size += sum(map(len, frame))
            try:
                _write_all(self._wfd, pieces)
            except OSError:
                os._exit(0)  # the host is gone; nothing left to serve
            with self._cond:
                self._queued -= size
                self._cond.notify_all()

    def _read_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = os.read(self._rfd, n - len(buf))
            except InterruptedError:
                continue
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _read_loop(self):
        while True:
            head = self._read_exact(HEADER.size)
            if head is None:
                break
            (size,) = HEADER.unpack(head)
            if size > MAX_FRAME:
                break
            body = self._read_exact(size)
            if body is None:
                break
            try:
                msg = json.loads(body.decode("utf-8"))
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "input_reply":
                self.input_replies.put(msg)
            else:
                self.requests.put(msg)
        self.requests.put(None)
        self.input_replies.put({"type": "input_reply", "error": "eof"})


# ---------------------------------------------------------------------------------------------
# Output capture


class StreamBuffer:
    """Text waiting to go out as one `stream` message; fed by sys.stdout/err and the fd pipes."""

    def __init__(self, channel, name):
        self._channel = channel
        self.name = name
        self._parts = []
        self._size = 0
        self._since = 0.0  # time.monotonic() of the oldest text waiting
        self._lock = threading.Lock()

    def write(self, text):
        if not text:
            return
        with self._lock:
            if not self._parts:
                self._since = time.monotonic()
            self._parts.append(text)
            self._size += len(text)
            big = self._size >= STREAM_CHUNK
        if big:
            self.flush()

    def flush_waited(self, seconds):
        """Flushes if the oldest text has waited `seconds`: the flusher's periodic tick, which
        so does not cut in two a line being written right now (`print` writes the text and the
        newline separately), as it could when it flushed whatever was there."""
        with self._lock:
            due = bool(self._parts) and time.monotonic() - self._since >= seconds
        if due:
            self.flush()

    def flush(self):
        with self._lock:
            if not self._parts:
                return
            text = "".join(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = []
            self._size = 0
            for start in range(0, len(text), STREAM_CHUNK):
                self._channel.send_stream(self.name, _utf8(text[start : start + STREAM_CHUNK]))


class TextStream(io.TextIOBase):
    """sys.stdout / sys.stderr replacement that feeds a StreamBuffer."""

    def __init__(self, buffer, fd):
        super().__init__()
        self._buffer = buffer
        self._fd = fd
        self._pid = os.getpid()

    name = property(lambda self: "<%s>" % self._buffer.name)
    encoding = "utf-8"
    errors = "replace"

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        if os.getpid() != self._pid:  # a forked child: our threads don't exist there
            os.write(self._fd, text.encode("utf-8", "replace"))
        else:
            self._buffer.write(text)
        return len(text)

    def flush(self):
        if os.getpid() == self._pid:
            self._buffer.flush()


class FdCapture:
    """Replaces `fd` with a pipe and forwards what anyone writes there to a StreamBuffer."""

    def __init__(self, fd, buffer):
        import codecs

        self._buffer = buffer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        os.set_blocking(r, False)
        self._r = r
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="repl-fd%d" % fd, daemon=True).start()

    def _drain_locked(self):
        while True:
            try:
                data = os.read(self._r, 65536)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            if not data:
                return
            self._buffer.write(self._decoder.decode(data))

    def _loop(self):
        while True:
            try:
                select.select([self._r], [], [])
            except InterruptedError:
                continue
            with self._lock:
                self._drain_locked()

    def sync(self, readable=True):
        """Forward everything written to the fd so far (called before a reply). The lock is
        taken even when the pipe is empty: the thread may hold data it has just read."""
        with self._lock:
            if readable:
                self._drain_locked()


def keep_freed_memory():
    """Lets this process keep memory it frees instead of handing it back to the guest kernel at
    once: glibc trims the heap top and unmaps large blocks on free, so every MB-sized string a
    loop builds and drops (`print(big)`, its UTF-8 copy) was faulted in page by page again, and
    under TCG a page fault costs ~30-140 us (output of 50 x 1 MB strings: 256 faults and
    7-12 ms per MB in the guest; with this, none and ~2 ms). Blocks of 4 MiB and more are still
    mapped and unmapped, and at most 32 MiB of free heap top is kept."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)
    mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)


def bound_output_history(shell):
    """IPython 9 keeps a copy of everything a cell writes to stdout/stderr in its history (for
    `%notebook`), for the whole session. In a guest of a few hundred MiB that ends in the OOM
    killer (six cells printing 50 MB each did), and every MB printed is a MB of fresh pages
    (~5 ms per MB under TCG, a third of the guest's cost of output). Here each stream of a cell
    is recorded only up to HISTORY_OUTPUT_CAP characters, in whole writes; what the frontend
    receives is unchanged."""
    ipython_tee = getattr(type(shell), "_tee", None)
    if ipython_tee is None:
        return

    @contextlib.contextmanager
    def bounded_tee(channel):
        stream = getattr(sys, channel)
        plain = stream.write
        with ipython_tee(shell, channel):
            recorded = stream.write
            budget = HISTORY_OUTPUT_CAP

            def write(data, *args, **kwargs):
                nonlocal budget
                size = len(data) if isinstance(data, str) else 0
                if size <= budget:
                    budget -= size
                    return recorded(data, *args, **kwargs)
                budget = 0
                return plain(data, *args, **kwargs)

            stream.write = write
            try:
                yield
            finally:
                stream.write = recorded  # IPython's tee puts back `plain` on its way out

    shell._tee = bounded_tee


class Output:
    """Owns both streams; `flush` makes everything written so far leave before what comes next."""

    def __init__(self, channel):
        self.stdout = StreamBuffer(channel, "stdout")
        self.stderr = StreamBuffer(channel, "stderr")
        self._captures = []
        self._libc_fflush = None

    def capture_fds(self):
        self._captures = [FdCapture(1, self.stdout), FdCapture(2, self.stderr)]
        try:
            import ctypes

            self._libc_fflush = ctypes.CDLL(None).fflush
        except Exception:
            self._libc_fflush = None
        threading.Thread(target=self._flush_loop, name="repl-flusher", daemon=True).start()

    def _flush_loop(self):
        while True:
            time.sleep(FLUSH_INTERVAL)
            try:
                self.stdout.flush_waited(FLUSH_INTERVAL)
                self.stderr.flush_waited(FLUSH_INTERVAL)
                state.channel.release_held()
            except Exception:
                pass

    def flush(self, fds=False):
        if fds:
            if self._libc_fflush is not None:
                try:
                    self._libc_fflush(None)
                except Exception:
                    pass
            # One select instead of a read (and a BlockingIOError) per empty pipe.
            try:
                ready = select.select([c._r for c in self._captures], [], [], 0)[0]
            except (OSError, ValueError):
                ready = [c._r for c in self._captures]
            for capture in self._captures:
                capture.sync(capture._r in ready)
        self.stdout.flush()
        self.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Shared state


class StdinNotImplementedError(RuntimeError):
    """input() was called, but the frontend does not support input requests."""


def _ignore_sigint(signum, frame):
    """SIGINT between requests: an interrupt has nothing to stop."""


class State:
    # Set by main() before the first request is read (quoted: class annotations are evaluated).
    channel: "Channel"
    output: "Output"
    _executing = False
    allow_stdin = False
    # input() from any thread: one request at a time (`input_lock`), each for the cell running
    # when it was called (`cell`, bumped at every cell's start and end). `cell_lock` orders a
    # request against the end of its cell, so none is sent after the cell ended and a waiting
    # one is woken then (`end_input`).
    cell = 0
    input_waiting = False
    input_lock = threading.Lock()
    cell_lock = threading.Lock()
    generation = None
    generation_stamp = None  # (inode, mtime) of the generation file when last read
    parent: dict = {}  # {"header": {"msg_id", "msg_type"}} of the Jupyter request being handled

    @property
    def executing(self):
        """True while user code runs (a cell, a widget callback): only then does SIGINT (the
        host's interrupt) raise KeyboardInterrupt. Set from the main thread only. While true,
        SIGINT has Python's own handler, as in a plain kernel: it raises without a Python frame
        of its own, so the traceback shows the user's frames only, and `asyncio.run` in a cell
        takes the interrupt over as it does there."""
        return self._executing

    @executing.setter
    def executing(self, value):
        value = bool(value)
        if value != self._executing:
            signal.signal(signal.SIGINT, signal.default_int_handler if value else _ignore_sigint)
        self._executing = value


def _parent_of(req):
    parent = req.get("parent")
    if isinstance(parent, dict) and isinstance(parent.get("header"), dict):
        return parent
    return {}


class KernelShim:
    """What `get_ipython().kernel` offers libraries that look for ipykernel's kernel object:
    the current request (ipywidgets' Output widget routes output by its msg_id)."""

    def get_parent(self, channel=None):
        return state.parent

    @property
    def _parent_header(self):
        return state.parent


state = State()


def _send(msg):
    state.channel.send(msg)


def _generation_stamp():
    # One stat before every cell instead of open/read/close.
    try:
        st = os.stat(GENERATION_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def install_hello_notification():
    """With SUPERMACHINE_NOTIFY_HELLO=<signal> (set by the host when it spawns the REPL), the
    agent sends that signal after every Hello: right after a restore the REPL queues a
    `restored` request and starts its warm-up at once, instead of when a host says hello.
    The variable is taken out of the environment user code sees."""
    value = os.environ.pop(NOTIFY_HELLO_ENV, None)
    try:
        signum = int(value or "")
    except ValueError:
        return None

    def on_hello(signum, frame):
        state.channel.requests.put({"type": "restored"})

    try:
        # Not SA_RESTART: the main thread must wake from its wait for the next request to run
        # the handler (a Hello comes between cells; Python retries its own interrupted calls).
        signal.signal(signum, on_hello)
    except (OSError, ValueError):
        return None
    return signum


def _read_generation():
    # Raw fds: this runs before every cell, and under TCG open() with its buffered text
    # layers costs several times more than open/read/close.
    try:
        fd = os.open(GENERATION_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def reseed_if_restored():
    """After a snapshot restore every clone has the same RNG state: reseed before user code.
    Returns True if this is the first call since a restore."""
    stamp = _generation_stamp()
    if stamp is not None and stamp == state.generation_stamp:
        return False  # the agent rewrites the file (a new inode) on every hello
    state.generation_stamp = stamp
    gen = _read_generation()
    if gen == state.generation:
        return False
    state.generation = gen
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            # The whole MT19937 state from the guest kernel's RNG (reseeded by the agent at the
            # restore). np.random.seed() derives it through SeedSequence instead: ~30 ms of
            # cold code right after a restore under TCG, against ~7 ms for this.
            key = np.frombuffer(os.urandom(624 * 4), dtype=np.uint32)
            np.random.set_state(("MT19937", key, 624))
        except Exception:
            pass
    return True


CELL_ENDED = "the cell that called %s has finished"


def _request_input(prompt, password):
    what = "getpass" if password else "input()"
    cell = state.cell
    if not state.allow_stdin:
        raise StdinNotImplementedError(
            "%s was called, but this frontend does not support input requests." % what
        )
    replies = state.channel.input_replies
    with state.input_lock:
        state.output.flush(fds=True)
        while True:  # drop stale replies
            try:
                replies.get_nowait()
            except queue.Empty:
                break
        with state.cell_lock:
            if state.cell != cell or not state.allow_stdin:
                raise EOFError("no input: " + CELL_ENDED % what)
            state.input_waiting = True
            _send({"type": "input_request", "prompt": str(prompt), "password": bool(password)})
        try:
            reply = replies.get()
        finally:
            with state.cell_lock:
                state.input_waiting = False
    error = reply.get("error")
    if error == "cell ended":
        raise EOFError("no input: " + CELL_ENDED % what)
    if error == "interrupted":
        raise KeyboardInterrupt("Interrupted by user")
    if error:
        raise EOFError("no input: %s" % error)
    value = reply.get("value", "")
    if value == "\x04":
        raise EOFError
    return str(value)


def begin_input(allow_stdin):
    """A cell starts: input() may ask the frontend if it allows stdin."""
    with state.cell_lock:
        state.cell += 1
        state.allow_stdin = allow_stdin


def end_input():
    """The cell ended: input() called for it from any thread raises EOFError, and a request
    still waiting is woken (the host drops it too), so no input_request outlives its cell."""
    with state.cell_lock:
        state.cell += 1
        state.allow_stdin = False
        if state.input_waiting:
            state.channel.input_replies.put({"type": "input_reply", "error": "cell ended"})
            state.input_waiting = False


def guest_input(prompt=""):
    return _request_input(prompt, False)


def guest_getpass(prompt="Password: ", stream=None):
    return _request_input(prompt, True)


# ---------------------------------------------------------------------------------------------
# Comms (ipywidgets 8 and anything else using the `comm` package)


def install_comm():
    """Points `comm.create_comm` / `comm.get_comm_manager` at comms that talk to the host."""
    try:
        import comm
        from comm.base_comm import BaseComm, CommManager
    except Exception:
        return None

    class GuestComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            state.output.flush()
            msg = {
                "type": msg_type,
                "comm_id": self.comm_id,
                "data": {} if data is None else data,
                "metadata": {} if metadata is None else metadata,
                "buffers": [base64.b64encode(bytes(b)).decode("ascii") for b in (buffers or [])],
            }
            for key, value in keys.items():
                if isinstance(value, (str, int, float, bool)) or value is None:
                    msg[key] = value
            _send(msg)

    manager = CommManager()
    comm.create_comm = lambda *args, **kwargs: GuestComm(*args, **kwargs)
    comm.get_comm_manager = lambda: manager
    return manager


def _comm_message(req):
    """A host comm frame as the message dict `comm` handlers expect."""
    buffers = []
    for b in req.get("buffers") or []:
        try:
            buffers.append(memoryview(base64.b64decode(b)))
        except (ValueError, TypeError):
            pass
    content = {"comm_id": req.get("comm_id"), "data": req.get("data") or {}}
    if req["type"] == "comm_open":
        content["target_name"] = req.get("target_name", "")
        content["target_module"] = req.get("target_module")
    header = dict(_parent_of(req).get("header") or {}, msg_type=req["type"])
    return {
        "header": header,
        "parent_header": {},
        "metadata": req.get("metadata") or {},
        "content": content,
        "buffers": buffers,
    }


# ---------------------------------------------------------------------------------------------
# Rich output helpers for the plain executor

_REPR_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
)


def plain_mimebundle(obj):
    data: dict = {}
    metadata: dict = {}
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method) and not inspect.isclass(obj):
        try:
            result = method()
            if isinstance(result, tuple):
                result, md = result
                metadata.update(md or {})
            if isinstance(result, dict):
                data.update(result)
        except Exception:
            pass
    for mime, name in _REPR_METHODS:
        if mime in data or inspect.isclass(obj):
            continue
        method = getattr(obj, name, None)
        if not callable(method):
            continue
        try:
            value = method()
        except Exception:
            continue
        if isinstance(value, tuple):
            value, md = value
            metadata[mime] = md
        if value is not None:
            data[mime] = value
    if "text/plain" not in data:
        try:
            data["text/plain"] = repr(obj)
        except Exception as e:
            data["text/plain"] = "<repr failed: %s>" % e
    return data, metadata


def _token_at(code, cursor_pos):
    """The dotted name ending at (or containing) the cursor."""
    if cursor_pos is None:
        cursor_pos = len(code)
    end = cursor_pos
    while end < len(code) and (code[end].isalnum() or code[end] == "_"):
        end += 1
    m = re.search(r"[A-Za-z_][\w.]*$", code[:end])
    return m.group(0).rstrip(".") if m else ""


def _line_at_cursor(code, cursor_pos):
    start = code.rfind("\n", 0, cursor_pos) + 1
    return code[start:cursor_pos], start


# ---------------------------------------------------------------------------------------------
# Executors


class PlainExecutor:
    """Used when the guest has no IPython: exec/eval with a simple display hook."""

    name = "plain"

    def __init__(self):
        import __main__

        self.ns = __main__.__dict__
        self.ns.setdefault("__builtins__", builtins)
        self.inputs = []  # (line number, source, output repr)
        self.execution_count = 1
        self.payload = []
        setattr(builtins, "display", self.display)  # as IPython does: display() without import
        if os.environ.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
            os.environ["MPLBACKEND"] = "Agg"  # the inline backend needs IPython; figures are
            # sent as PNG after each cell instead (_flush_figures)

    def banner(self):
        return "Python %s (no IPython in this image)" % platform.python_version()

    def display(self, *objs, **kwargs):
        for obj in objs:
            data, md = plain_mimebundle(obj)
            state.output.flush()
            _send({"type": "display_data", "data": data, "metadata": md, "transient": {}})

    def format_exception(self, etype, evalue, tb):
        return traceback.format_exception(etype, evalue, tb)

    def format_value(self, value):
        return plain_mimebundle(value)

    def _error(self, etype, evalue, tb_list):
        state.output.flush()
        err = {"ename": etype.__name__, "evalue": str(evalue), "traceback": tb_list}
        _send(dict(err, type="error"))
        return err

    def run(self, code, silent, store_history):
        count = self.execution_count
        filename = "<cell-%d>" % count
        try:
            tree = ast.parse(code, filename, "exec")
        except (SyntaxError, ValueError, OverflowError) as e:
            return self._error(type(e), e, traceback.format_exception_only(type(e), e))
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not silent:
            last = ast.Expression(tree.body.pop().value)
        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        result = None
        try:
            self._run_code(compile(tree, filename, "exec", flags=flags))
            if last is not None:
                result = self._run_code(compile(last, filename, "eval", flags=flags))
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            if isinstance(e, SystemExit):
                pass
            tb = e.__traceback__
            # Hide this driver's own frames.
            while tb is not None and tb.tb_frame.f_code.co_filename != filename:
                tb = tb.tb_next
            lines = traceback.format_exception(type(e), e, tb)
            return self._error(type(e), e, lines)
        finally:
            if store_history:
                self.inputs.append((count, code, None))
                self.execution_count += 1
        self._flush_figures()
        if result is not None:
            self.ns["_"] = result
            data, md = plain_mimebundle(result)
            if self.inputs and store_history:
                self.inputs[-1] = (count, code, data.get("text/plain"))
            state.output.flush()
            state.channel.send({"type": "execute_result", "execution_count": count, "data": data,
                                "metadata": md}, hold=True)
        return None

    def warm_cell(self):
        """Compiles and runs a trivial cell outside the user's namespace (after-restore warm-up)."""
        tree = ast.parse("x = 1 + 1\nx", "<warm-up>", "exec")
        expr = tree.body.pop()
        assert isinstance(expr, ast.Expr)
        last = ast.Expression(expr.value)
        scratch = {"__builtins__": builtins}
        eval(compile(tree, "<warm-up>", "exec"), scratch)  # noqa: S307
        plain_mimebundle(eval(compile(last, "<warm-up>", "eval"), scratch))  # noqa: S307

    def _run_code(self, codeobj):
        result = eval(codeobj, self.ns)  # noqa: S307 - that is the job
        if inspect.iscoroutine(result):
            import asyncio

            result = asyncio.new_event_loop().run_until_complete(result)
        return result

    def _flush_figures(self):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in list(plt.get_fignums()):
            fig = plt.figure(num)
            buf = io.BytesIO()
            try:
                fig.savefig(buf, format="png", bbox_inches="tight")
                self.display_png(buf.getvalue())
            finally:
                plt.close(fig)

    def display_png(self, png):
        _send(
            {
                "type": "display_data",
                "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<Figure>"},
                "metadata": {},
                "transient": {},
            }
        )

    def user_expressions(self, expressions):
        out = {}
        for key, expr in expressions.items():
            try:
                value = eval(expr, self.ns)  # noqa: S307
                data, md = plain_mimebundle(value)
                out[key] = {"status": "ok", "data": data, "metadata": md}
            except Exception as e:
                out[key] = {
                    "status": "error",
                    "ename": type(e).__name__,
                    "evalue": str(e),
                    "traceback": traceback.format_exception_only(type(e), e),
                }
        return out

    def complete(self, code, cursor_pos):
        import rlcompleter

        line, _ = _line_at_cursor(code, cursor_pos)
        m = re.search(r"[\w.]*$", line)
        text = m.group(0) if m else ""
        completer = rlcompleter.Completer(self.ns)
        matches = []
        for i in range(1000):
            try:
                match = completer.complete(text, i)
            except Exception:
                break
            if match is None:
                break
            matches.append(match.rstrip("("))
        return {
            "matches": sorted(set(matches)),
            "cursor_start": cursor_pos - len(text),
            "cursor_end": cursor_pos,
            "metadata": {},
            "status": "ok",
        }

    def _lookup(self, name):
        parts = name.split(".")
        if parts[0] in self.ns:
            obj = self.ns[parts[0]]
        elif hasattr(builtins, parts[0]):
            obj = getattr(builtins, parts[0])
        else:
            raise KeyError(name)
        for part in parts[1:]:
            obj = getattr(obj, part)
        return obj

    def inspect(self, code, cursor_pos, detail_level, omit_sections):
        import pydoc

        name = _token_at(code, cursor_pos)
        try:
            obj = self._lookup(name)
        except Exception:
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        # typeshed lacks pydoc.plaintext (a _PlainTextDoc, pydoc.text without bold)
        plain = pydoc.plaintext  # type: ignore[attr-defined]
        text = pydoc.render_doc(obj, title="%s", renderer=plain)
        if detail_level:
            try:
                text += "\n\nSource:\n" + inspect.getsource(obj)
            except (OSError, TypeError):
                pass
        return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}

    def is_complete(self, code):
        try:
            result = codeop.compile_command(code, "<input>", "exec")
        except (SyntaxError, OverflowError, ValueError):
            return {"status": "invalid"}
        if result is None:
            last = code.rstrip("\n").split("\n")[-1] if code.strip() else ""
            indent = last[:len(last) - len(last.lstrip())]
            if last.rstrip().endswith(":"):
                indent += "    "
            return {"status": "incomplete", "indent": indent}
        return {"status": "complete"}

    def history(self, hist_access_type, output=False, raw=True, session=0, start=0, stop=None,
                n=None, pattern=None, unique=False, **_):
        def row(entry):
            line, source, out = entry
            return [1, line, [source, out] if output else source]

        entries = self.inputs
        if hist_access_type == "tail":
            entries = entries[-n:] if n else entries
        elif hist_access_type == "range":
            entries = [e for e in entries if e[0] >= (start or 0) and (stop is None or e[0] < stop)]
        elif hist_access_type == "search":
            rx = fnmatch.translate(pattern or "*")
            entries = [e for e in entries if re.match(rx, e[1])]
            if unique:
                seen, kept = set(), []
                for e in reversed(entries):
                    if e[1] not in seen:
                        seen.add(e[1])
                        kept.append(e)
                entries = list(reversed(kept))
            if n:
                entries = entries[-n:]
        else:
            entries = []
        return {"status": "ok", "history": [row(e) for e in entries]}


# Exact types whose instances can carry no `_repr_*_`, `_repr_mimebundle_` or
# `_ipython_display_` of their own (built-in types take no new attributes).
SCALAR_TYPES = frozenset((int, float, complex, bool, str, bytes))


def install_scalar_fast_path(display_formatter):
    """`1+1`, `len(df)`, `x.mean()`: for an exact built-in scalar, IPython asks each of its ~12
    formatters in turn, each looking the type up, probing the object for `_repr_*_` methods
    (an AttributeError raised and caught per probe) and wrapping the call in error handling:
    ~1.5 ms of a TCG guest's time for a result whose only representation is text/plain. Unless a
    formatter other than text/plain has a printer registered for the type (or the object), the
    fast path asks the text/plain formatter only, with the same result; and where that
    formatter's printer for the type is the pretty printer's plain `repr` (ints, strings, bytes,
    True/False), it is `repr(obj)` without building a pretty printer (~0.4 ms more)."""
    from IPython.lib import pretty

    full = display_formatter.format
    repr_printer = getattr(pretty, "_repr_pprint", None)
    # For each scalar type: its classes, each with the (module, name) deferred printers use.
    lookups = {t: tuple((c, (c.__module__, c.__name__)) for c in t.__mro__) for t in SCALAR_TYPES}

    def claims(values, obj, lookup):
        """Whether a formatter (its trait values) has a printer for `obj` (classes `lookup`)."""
        if id(obj) in values["singleton_printers"]:
            return True
        types = values["type_printers"]
        deferred = values["deferred_printers"]
        for c, key in lookup:
            if c in types or key in deferred:
                return True
        return False

    def others_claim(obj, formatters, lookup):
        """Whether a formatter other than text/plain would add to the result. Trait values are
        read from the dict traitlets keeps them in (its descriptors cost ~10 us per read under
        TCG, dozens of reads per result); one that is not set yet: True (the long way)."""
        try:
            own = display_formatter._trait_values
            for f in (own["ipython_display_formatter"], own["mimebundle_formatter"]):
                values = f._trait_values
                if values["enabled"] and claims(values, obj, lookup):
                    return True
            for kind, f in formatters.items():
                if kind != "text/plain":
                    values = f._trait_values
                    if values["enabled"] and claims(values, obj, lookup):
                        return True
        except (AttributeError, KeyError):
            return True
        return False

    def plain_text(plain, obj, lookup):
        try:
            values = plain._trait_values
            pprint = values["pprint"]
            singletons = values["singleton_printers"]
            types = values["type_printers"]
            deferred = values["deferred_printers"]
        except (AttributeError, KeyError):
            return plain(obj)
        if repr_printer is None:
            return plain(obj)
        if pprint:
            printer = singletons.get(id(obj))
            if printer is None:
                for c, key in lookup:
                    if c in types:
                        printer = types[c]
                        break
                    if key in deferred or "_repr_pretty_" in c.__dict__:
                        break
            if printer is not repr_printer:
                return plain(obj)
        try:
            return repr(obj)  # what _repr_pprint prints for a one-line repr; and pprint off
        except Exception:  # e.g. an int too long to print: IPython's formatter reports it
            return plain(obj)

    def format(obj, include=None, exclude=None):
        lookup = lookups.get(type(obj))
        if lookup is not None and not include and not exclude:
            formatters = getattr(display_formatter, "_trait_values", {}).get("formatters")
            if formatters is not None and "text/plain" in formatters:
                if not others_claim(obj, formatters, lookup):
                    data = plain_text(formatters["text/plain"], obj, lookup)
                    if isinstance(data, str):
                        return {"text/plain": data}, {}
        return full(obj, include=include, exclude=exclude)

    display_formatter.format = format


def install_token_fast_path(manager):
    """IPython tokenizes every cell to look for `%magic`, `!shell`, `x = %magic`, `x = !cmd`,
    `obj?` and the other escapes (~0.7 ms of a TCG guest's time for `1+1`). Each of its token
    transformers needs one of the escape characters: `!`, `?` or `%` anywhere, or one of the
    line-start escapes (`,`, `;`, `/`) as the first character of a line. A cell with none of
    them is returned unchanged without tokenizing; the result is the same. Only installed while
    the transformers are IPython's own (a user-added one always gets the full path)."""
    from IPython.core import inputtransformer2 as it2

    known = {getattr(it2, name, None) for name in ("MagicAssign", "SystemAssign", "EscapedCommand",
                                                   "HelpEnd")}
    default = list(manager.token_transformers)
    if not default or not set(default) <= known:
        return
    line_start = tuple(it2.ESCAPE_SINGLES) + tuple(it2.ESCAPE_DOUBLES)
    anywhere = tuple(set("!?%") | (set(it2.ESCAPE_SINGLES) - set(",;/")))
    full = manager.do_token_transforms

    def do_token_transforms(lines):
        if manager.token_transformers != default:
            return full(lines)
        text = "".join(lines)
        if any(ch in text for ch in anywhere):
            return full(lines)
        for line in lines:
            if line.lstrip().startswith(line_start):
                return full(lines)
        return lines

    manager.do_token_transforms = do_token_transforms


# A line of only spaces/tabs: textwrap.dedent (IPython's leading_indent) empties such lines.
_BLANK_WITH_SPACES = re.compile(r"^[ \t]+$", re.MULTILINE)


def install_cleanup_fast_path(manager):
    """Before its token transforms IPython runs four cleanup passes and one line pass over every
    cell: drop leading blank lines, dedent (textwrap.dedent of the whole cell), strip `>>>` and
    `In [n]:` prompts (with a triple-quote scan for pasted doctests), and `%%` cell magics
    (~0.3 ms of a TCG guest's time for `1+1`). A cell that starts with a non-blank character,
    has no line of only spaces/tabs, contains none of `>>>`, `...`, `In [` and does not start
    with `%%` comes out of all five unchanged, so the passes are skipped for it (the token
    transforms still run, see install_token_fast_path). Only installed while the passes are
    IPython's own."""
    from IPython.core import inputtransformer2 as it2

    cleanup = [getattr(it2, name, None) for name in ("leading_empty_lines", "leading_indent",
                                                      "classic_prompt", "ipython_prompt")]
    lines_pass = [getattr(it2, "cell_magic", None)]
    if list(manager.cleanup_transforms) != cleanup or list(manager.line_transforms) != lines_pass:
        return
    full = manager.transform_cell

    def transform_cell(cell):
        if (manager.cleanup_transforms != cleanup
                or manager.line_transforms != lines_pass
                or not cell or cell[0].isspace() or cell.startswith("%%")
                or ">>>" in cell or "..." in cell or "In [" in cell
                or _BLANK_WITH_SPACES.search(cell)):
            return full(cell)
        if not cell.endswith("\n"):
            cell += "\n"
        return "".join(manager.do_token_transforms(cell.splitlines(keepends=True)))

    manager.transform_cell = transform_cell


# ---------------------------------------------------------------------------------------------
# The shell's kernel side: what ipykernel's ZMQInteractiveShell adds to IPython, made for a VM

# GUI names that need no event loop because figures go to the notebook (ipykernel's list).
NOTEBOOK_GUIS = frozenset((None, "inline", "nbagg", "webagg", "notebook", "ipympl", "widget"))

NO_DISPLAY = (
    "%s needs a display, and this microVM guest has none: GUI event loops (Qt, Tk, GTK, wx, "
    "macOS) cannot run here. Figures go to the notebook instead: `%%matplotlib inline` (the "
    "default), with `%%config InlineBackend.figure_format = 'svg'` for SVG."
)

# Options of `pip install` / `conda install` that take a value (the value is not a package).
_INSTALL_VALUE_OPTIONS = frozenset((
    "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-t", "--target", "--prefix", "--root", "--platform", "--python-version", "--implementation",
    "--abi", "--src", "--upgrade-strategy", "--progress-bar", "--report", "--python", "-p",
    "--channel", "-n", "--name", "--cache-dir", "--log", "--timeout", "--retries", "--proxy",
))
# Options that name requirements we cannot check without an installer (files, editable trees).
_INSTALL_SOURCE_OPTIONS = frozenset(("-r", "--requirement", "-e", "--editable", "--file"))
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def _normalized(name):
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions():
    """{normalized name: (name, version, summary, location)} of the Python distributions the
    guest image has."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        meta = dist.metadata
        name = meta["Name"] if meta is not None and "Name" in meta else None
        if not name or _normalized(name) in found:
            continue  # the first on sys.path wins, as for imports
        location = getattr(dist, "_path", None)
        summary = meta["Summary"] if "Summary" in meta else None
        found[_normalized(name)] = (name, dist.version or "", summary or "",
                                    str(location.parent) if location is not None else "")
    return found


def install_request(args):
    """What `install ARGS` asks for: (package names, sources it names that are not a plain
    package name: requirement files, paths, URLs)."""
    names, others = [], []
    args = iter(args)
    for arg in args:
        if arg in _INSTALL_VALUE_OPTIONS:
            next(args, None)
        elif arg in _INSTALL_SOURCE_OPTIONS:
            others.append("%s %s" % (arg, next(args, "")))
        elif arg.startswith("-"):
            if arg.split("=", 1)[0] in _INSTALL_SOURCE_OPTIONS:
                others.append(arg)
        elif "/" in arg or "://" in arg or arg.endswith((".whl", ".tar.gz", ".zip")):
            others.append(arg)
        else:
            m = _REQUIREMENT_NAME.match(arg)
            if m:
                names.append(m.group(0))
            else:
                others.append(arg)
    return names, others


def no_installer(magic, line):
    """`%pip LINE` (or %conda, %mamba, %micromamba, %uv): the guest has no network and no
    installer. What the image itself answers is answered (install of packages it already has,
    list, freeze, show); anything else gets a message saying why not and what to do instead.
    Output only, no exception: the reply is ok, as ipykernel's %pip reply is ok whatever pip
    did, so a notebook runs on as it would there."""
    import shlex

    try:
        args = shlex.split(line)
    except ValueError:
        args = line.split()
    prefix = "%" + magic
    if magic == "uv" and args[:1] == ["pip"]:
        args = args[1:]
        prefix += " pip"
    command = args[0] if args else ""
    rest = args[1:]
    have = image_distributions()
    if command in ("list", "freeze"):
        rows = sorted(have.values(), key=lambda d: d[0].lower())
        if command == "freeze":
            print("\n".join("%s==%s" % (name, version) for name, version, _, _ in rows))
        else:
            width = max([len("Package")] + [len(r[0]) for r in rows])
            lines = ["%-*s %s" % (width, "Package", "Version"), "%s %s" % ("-" * width, "-" * 7)]
            lines += ["%-*s %s" % (width, name, version) for name, version, _, _ in rows]
            print("\n".join(lines))
        return
    if command == "show" and rest:
        blocks = []
        for name in rest:
            if name.startswith("-"):
                continue
            dist = have.get(_normalized(name))
            if dist is None:
                print("WARNING: Package(s) not found: %s" % name, file=sys.stderr)
                continue
            blocks.append("Name: %s\nVersion: %s\nSummary: %s\nLocation: %s" % dist)
        if blocks:
            print("\n---\n".join(blocks))
        return
    why = ("there is no package installer in this microVM guest: it has no network and no %s, "
           "and the guest's packages come with its image (`%%pip list` shows them)." % magic)
    if command == "install":
        names, others = install_request(rest)
        present = [have[_normalized(n)] for n in names if _normalized(n) in have]
        missing = [n for n in names if _normalized(n) not in have]
        if names and not missing and not others:
            print("Already in this image: %s" % ", ".join("%s %s" % d[:2] for d in present))
            return
        lines = ["%s install: %s" % (prefix, why)]
        if present:
            lines.append("Already in this image: %s." % ", ".join("%s %s" % d[:2] for d in present))
        if missing:
            lines.append("Not in this image: %s." % ", ".join(missing))
        if others:
            lines.append("Not checked (no installer to read them): %s." % ", ".join(others))
        lines.append("To use other packages, build an image that includes them and select it: "
                     "`supermachine-kernel image build ROOTFS_DIR --name NAME` on the host (see "
                     "the README), then `c.MicroVMKernel.image = \"NAME\"`.")
        print("\n".join(lines), file=sys.stderr)
        return
    what = "%s %s" % (prefix, command) if command else prefix
    print("%s: %s What works here: `%%pip list`, `%%pip freeze`, `%%pip show NAME`, and "
          "`%%pip install NAME` for packages the image has." % (what, why), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Network: what the kernel's policy opens (kernel/network.py sends it after every attach)

NETWORK_ENV_KEYS = frozenset(("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                              "https_proxy", "all_proxy", "no_proxy"))
# set by Driver.do_network (set_network): "on", and "set": the variables it set, with values
network: dict = {"on": False, "set": {}}
PIP_ENV = {
    # The image is read-only and this VM's writes are its own: Debian's "externally managed"
    # marker protects nothing here.
    "PIP_BREAK_SYSTEM_PACKAGES": "1",
    "PIP_ROOT_USER_ACTION": "ignore",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",  # no extra request to the index
    "PIP_NO_CACHE_DIR": "1",  # the cache would live in guest RAM
}
PIP_NOTE = ("Note: %pip installs into this VM's writable layer (guest memory): %snapshot keeps "
            "it and %restore brings it back, a kernel restart starts without it. To have a "
            "package in every session, build it into the kernel's image (`supermachine-kernel "
            "prepare --image REF --packages NAME`, or c.MicroVMKernel.packages).")


NETWORK_CA_FILE = "/tmp/.supermachine-network-ca.pem"
# Where Python's ssl (OpenSSL), requests, pip and curl read a CA bundle from.
CA_ENV_KEYS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")


def set_network(env, ca=None):
    """The proxy variables the kernel sent (names from NETWORK_ENV_KEYS only), so user code and
    its subprocesses (pip, curl) reach the network through the kernel's proxy; with `ca` (PEM
    text, c.MicroVMKernel.network_ca_certificates) the CA bundle they trust instead of their
    own.

    Sent after every attach, also by a kernel without a policy (an empty `env`): this process
    may come from a snapshot taken under another kernel's policy, and a variable a policy set
    then must not point a kernel without one at a proxy that is not there. What an earlier
    request set and this one does not is removed, unless something else changed it since (the
    user's or the image's own value stays)."""
    previous: dict = network.get("set", {})
    given: dict = {}
    if isinstance(ca, str) and ca:
        fd = os.open(NETWORK_CA_FILE + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(ca)
        os.replace(NETWORK_CA_FILE + ".tmp", NETWORK_CA_FILE)
        given.update((key, NETWORK_CA_FILE) for key in CA_ENV_KEYS)
    for key, value in env.items():
        if key in NETWORK_ENV_KEYS and isinstance(value, str) and "\0" not in value:
            given[key] = value
    applied = any(key in NETWORK_ENV_KEYS for key in given)
    if applied:
        for key, value in PIP_ENV.items():  # `!pip install` too
            if key not in os.environ or previous.get(key) == os.environ[key]:
                given[key] = value
    for key, value in previous.items():
        if key not in given and os.environ.get(key) == value:
            del os.environ[key]
    os.environ.update(given)
    network["set"] = given
    network["on"] = applied


def pip_magic(line):
    """`%pip LINE`: the guest's own pip (`python3 -m pip`, through the kernel's proxy) when the
    kernel's policy gives this guest network and the image has pip; else no_installer."""
    import importlib.util
    import shlex
    import subprocess

    try:
        args = shlex.split(line)
    except ValueError:
        args = line.split()
    if not network["on"] or importlib.util.find_spec("pip") is None:
        if network["on"] and args[:1] == ["install"]:
            print("%pip: this guest image has no pip (build an image whose Python has it, "
                  "or that has the kernel layer).", file=sys.stderr)
        return no_installer("pip", line)
    sys.stdout.flush()
    sys.stderr.flush()
    code = subprocess.call([sys.executable, "-m", "pip"] + args, stdin=subprocess.DEVNULL)
    if args[:1] in (["install"], ["uninstall"]):
        import importlib
        import site

        importlib.invalidate_caches()
        user_site = site.getusersitepackages()
        if os.path.isdir(user_site) and user_site not in sys.path:
            site.addsitedir(user_site)  # a non-root user's first --user install
        if args[:1] == ["install"] and code == 0:
            print(PIP_NOTE)
    if code:
        print("%pip: pip exited with status " + str(code), file=sys.stderr)


def init_import_path():
    """As in ipykernel: the driver's own directory is not on sys.path (its launcher removes it),
    and the working directory ('') is, before site-packages (IPython's init_path), so
    `import mymodule` finds a module the notebook wrote with %%writefile, wherever %cd went."""
    driver = globals().get("__file__")
    here = os.path.dirname(os.path.abspath(driver)) if driver else ""
    if sys.path and sys.path[0] in ("", here):
        del sys.path[0]
    if "" not in sys.path:
        at = next((i for i, p in enumerate(sys.path)
                   if p.endswith(("site-packages", "dist-packages"))), len(sys.path))
        sys.path.insert(at, "")


def install_shell_module(shell_class):
    """tqdm.auto (and others) choose notebook widgets only when `"ipykernel.zmqshell" in
    sys.modules`. The guest has no ipykernel: a stand-in module of that name holds the guest's
    shell class and nothing else (`import ipykernel` still fails, as it should)."""
    import types

    if "ipykernel.zmqshell" not in sys.modules:
        module = types.ModuleType("ipykernel.zmqshell", install_shell_module.__doc__)
        setattr(module, "ZMQInteractiveShell", shell_class)
        sys.modules["ipykernel.zmqshell"] = module


def guest_kernel_magics():
    """The magics ipykernel's shell adds to IPython (%clear, %less, %more, %man, %edit,
    %autosave, %connect_info, %qtconsole) as far as they make sense in a VM, and %pip, %conda,
    %mamba, %micromamba and %uv, which have no installer to run here (see no_installer)."""
    import shutil

    from IPython.core import page
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, line_magic, magics_class

    NO_EDITOR = ("%edit would start an editor inside the microVM guest, which has none. Write a "
                 "guest file with `%%writefile FILE` and bring one into a cell with `%load FILE`.")

    @magics_class
    class GuestKernelMagics(Magics):
        @line_magic
        def clear(self, arg_s):
            """Clear the terminal (writes the escape sequence `clear` writes)."""
            sys.stdout.write("\x1b[H\x1b[2J")

        @line_magic
        def less(self, arg_s):
            """Show a guest file through the pager. Files ending in .py are syntax-highlighted."""
            self._page_file(arg_s)

        @line_magic
        def more(self, arg_s):
            """Show a guest file through the pager (same as %less)."""
            self._page_file(arg_s)

        def _page_file(self, path):
            if not path:
                raise UsageError("Missing filename.")
            if path.endswith(".py"):
                from IPython.utils import openpy

                assert self.shell is not None
                text = self.shell.pycolorize(openpy.read_py_file(path, skip_encoding_cookie=False))
            else:
                with open(path) as f:
                    text = f.read()
            page.page(text)

        @line_magic
        def man(self, arg_s):
            """Show a man page of the guest through the pager."""
            if shutil.which("man") is None:
                raise UsageError("this guest image has no man pages (no `man` command): try "
                                 "`!%s --help`, or `help(obj)` / `obj?` for Python objects."
                                 % (arg_s or "CMD"))
            assert self.shell is not None
            page.page(self.shell.getoutput("man %s | col -b" % arg_s, split=False))

        @line_magic
        def edit(self, arg_s):
            """Not available: an editor would run inside the VM, which has none."""
            raise UsageError(NO_EDITOR)

        @line_magic
        def ed(self, arg_s):
            """Alias for %edit."""
            raise UsageError(NO_EDITOR)

        @line_magic
        def autosave(self, arg_s):
            """Set the notebook's autosave interval in seconds (0 disables it); only the classic
            notebook acts on it."""
            from IPython.display import Javascript, display

            try:
                interval = int(arg_s)
            except ValueError:
                raise UsageError("%%autosave requires an integer, got %r" % arg_s) from None
            display(Javascript("IPython.notebook.set_autosave_interval(%i)" % (1000 * interval)),
                    include=["application/javascript"])
            print("Autosaving every %i seconds" % interval if interval else "Autosave disabled")

        @line_magic
        def connect_info(self, arg_s):
            """Not available in the guest: the kernel and its connection file are on the host."""
            raise UsageError("this kernel's connection file is on the host, not in the microVM "
                             "guest: `jupyter --runtime-dir` on the host shows where it is "
                             "(kernel-ID.json).")

        @line_magic
        def qtconsole(self, arg_s):
            """Not available: a Qt console needs a display."""
            raise UsageError(NO_DISPLAY % "%qtconsole")

        @line_magic
        def pip(self, line):
            """No installer in the guest: its packages come with the image. `%pip list`,
            `%pip freeze` and `%pip show NAME` show them; `%pip install NAME` says whether the
            image has NAME and, if not, what to do instead. When the kernel's policy opens the
            network (c.MicroVMKernel.allow_network), the guest's own pip runs instead."""
            pip_magic(line)

        @line_magic
        def conda(self, line):
            """No installer in the guest: see %pip."""
            no_installer("conda", line)

        @line_magic
        def mamba(self, line):
            """No installer in the guest: see %pip."""
            no_installer("mamba", line)

        @line_magic
        def micromamba(self, line):
            """No installer in the guest: see %pip."""
            no_installer("micromamba", line)

        @line_magic
        def uv(self, line):
            """No installer in the guest: see %pip."""
            no_installer("uv", line)

    return GuestKernelMagics


class IPythonExecutor:
    """Runs cells with IPython's InteractiveShell: magics, rich tracebacks, display machinery."""

    name = "ipython"

    def __init__(self):
        from IPython.core.displayhook import DisplayHook
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.error import UsageError
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.core import page

        class GuestDisplayPublisher(DisplayPublisher):
            def publish(self, data, metadata=None, source=None, *, transient=None, update=False,
                        **kwargs):
                state.output.flush()
                _send(
                    {
                        "type": "update_display_data" if update else "display_data",
                        "data": data,
                        "metadata": metadata or {},
                        "transient": transient or {},
                    }
                )

            def clear_output(self, wait=False):
                state.output.flush()
                _send({"type": "clear_output", "wait": bool(wait)})

        class GuestDisplayHook(DisplayHook):
            msg: "dict | None" = None  # the execute_result being built

            def quiet(self):
                # IPython tokenizes the whole cell to see whether it ends with `;`; a cell
                # without any `;` cannot (~0.4 ms of a TCG guest's time per result).
                info = getattr(getattr(self, "exec_result", None), "info", None)
                raw = getattr(info, "raw_cell", None)
                if isinstance(raw, str) and ";" not in raw:
                    return False
                return super().quiet()

            def start_displayhook(self):
                self.msg = {"type": "execute_result", "data": {}, "metadata": {}}

            def write_output_prompt(self):
                assert self.msg is not None  # IPython calls start_displayhook first
                self.msg["execution_count"] = self.prompt_count

            def write_format_data(self, format_dict, md_dict=None):
                assert self.msg is not None
                self.msg["data"] = format_dict
                self.msg["metadata"] = md_dict or {}

            def finish_displayhook(self):
                state.output.flush()
                msg, self.msg = self.msg, None
                if msg and msg["data"]:
                    state.channel.send(msg, hold=True)  # goes out with the reply

        executor = self

        class ZMQInteractiveShell(InteractiveShell):
            """The guest's shell. It has ipykernel's shell's name (there is no ZMQ here), since
            libraries check `get_ipython().__class__.__name__ == "ZMQInteractiveShell"` to know
            their output goes to a notebook (rich, for one)."""

            kernel = KernelShim()

            def get_parent(self):
                return state.parent

            def set_parent(self, parent):
                state.parent = parent or {}

            def _showtraceback(self, etype, evalue, stb):
                state.output.flush()
                err = {"ename": getattr(etype, "__name__", str(etype)), "evalue": str(evalue),
                       "traceback": list(stb)}
                executor.last_error = err
                _send(dict(err, type="error"))

            def ask_exit(self):
                assert self.payload_manager is not None  # made when the shell starts
                self.payload_manager.write_payload({"source": "ask_exit", "keepkernel": False})

            def should_run_async(self, raw_cell, *, transformed_cell=None,
                                 preprocessing_exc_tuple=None):
                # IPython compiles every cell once more to look for top-level await; a cell
                # without the words `await` or `async` cannot have any (saves that compile).
                cell = transformed_cell if transformed_cell is not None else raw_cell
                if "await" not in cell and "async" not in cell:
                    return False
                return super().should_run_async(raw_cell, transformed_cell=transformed_cell,
                                                preprocessing_exc_tuple=preprocessing_exc_tuple)

            def set_next_input(self, text, replace=False):
                assert self.payload_manager is not None
                self.payload_manager.write_payload(
                    {"source": "set_next_input", "text": text, "replace": replace}
                )

            def init_hooks(self):
                super().init_hooks()

                def pager(strg, start=0, screen_lines=0, pager_cmd=None):
                    data = strg if isinstance(strg, dict) else {"text/plain": strg}
                    assert self.payload_manager is not None
                    self.payload_manager.write_payload(
                        {"source": "page", "data": data, "start": max(0, start)}
                    )

                self.set_hook("show_in_pager", page.as_hook(pager), 99)

            def init_environment(self):
                for key, value in (("PAGER", "cat"), ("GIT_PAGER", "cat"),
                                   ("CLICOLOR_FORCE", "1")):
                    os.environ.setdefault(key, value)

            def init_virtualenv(self):
                pass  # as in ipykernel: a kernel uses the Python it runs on

            def init_magics(self):
                super().init_magics()
                self.register_magics(guest_kernel_magics())

            def enable_gui(self, gui=None):
                # Only the loop-less "GUIs" of notebook figures; IPython's base class raises
                # NotImplementedError, which `%matplotlib inline` ended with.
                if gui not in NOTEBOOK_GUIS:
                    raise UsageError(NO_DISPLAY % ("%%gui %s" % gui))
                self.active_eventloop = gui

            def enable_matplotlib(self, gui=None):
                # A desktop backend is refused before matplotlib switches to it.
                from IPython.core import pylabtools

                try:
                    wanted, _ = pylabtools.find_gui_and_backend(gui, self.pylab_gui_select)
                except Exception:
                    wanted = None  # matplotlib's own error follows
                if wanted not in NOTEBOOK_GUIS:
                    raise UsageError(NO_DISPLAY % ("%%matplotlib %s" % (gui or wanted)))
                return super().enable_matplotlib(gui)

        from traitlets.config import Config

        cfg = Config()
        cfg.HistoryManager.hist_file = ":memory:"
        # An in-memory database either way; reads (history requests) write the cache out
        # first, so batching only saves a SQLite transaction per cell.
        cfg.HistoryManager.db_cache_size = 100
        cfg.InteractiveShell.colors = "linux"
        cfg.InteractiveShell.xmode = "Context"
        cfg.IPKernelApp = Config()  # how tqdm & co. recognise a notebook frontend
        self.last_error = None
        self.shell = ZMQInteractiveShell.instance(
            config=cfg,
            displayhook_class=GuestDisplayHook,
            display_pub_class=GuestDisplayPublisher,
        )
        self.shell.display_page = True
        self.shell.enable_html_pager = True
        install_shell_module(ZMQInteractiveShell)
        init_import_path()
        install_scalar_fast_path(self.shell.display_formatter)
        install_token_fast_path(self.shell.input_transformer_manager)
        install_cleanup_fast_path(self.shell.input_transformer_manager)
        # The inline matplotlib backend registers its figure flush on post_execute when imported
        # under IPython; MPLBACKEND (set by the host) selects it.

    def banner(self):
        import IPython

        return "Python %s\nIPython %s -- An enhanced Interactive Python." % (
            platform.python_version(),
            IPython.__version__,
        )

    def format_exception(self, etype, evalue, tb):
        return self.shell.InteractiveTB.structured_traceback(etype, evalue, tb)

    def format_value(self, value):
        assert self.shell.display_formatter is not None
        return self.shell.display_formatter.format(value)

    @property
    def execution_count(self):
        return self.shell.execution_count

    @execution_count.setter
    def execution_count(self, value):
        self.shell.execution_count = value

    def run(self, code, silent, store_history):
        self.last_error = None
        res = self.shell.run_cell(code, store_history=store_history, silent=silent)
        if res.success:
            return None
        if self.last_error is not None:
            return self.last_error
        err = res.error_before_exec or res.error_in_exec
        return {"ename": type(err).__name__, "evalue": str(err), "traceback": []}

    def warm_cell(self):
        """A silent, history-less cell with the shell's event callbacks set aside, so nothing
        the user registered (post_execute hooks, figure flushing) sees it (after-restore
        warm-up; the execution count, history and `_` variables are not touched)."""
        events = self.shell.events
        saved = events.callbacks
        events.callbacks = {name: [] for name in saved}
        try:
            self.shell.run_cell("1 + 1", store_history=False, silent=True)
        finally:
            events.callbacks = saved

    def take_payload(self):
        manager = self.shell.payload_manager
        assert manager is not None
        payload = manager.read_payload()
        if payload:
            manager.clear_payload()
        return payload

    def user_expressions(self, expressions):
        return self.shell.user_expressions(expressions)

    def complete(self, code, cursor_pos):
        try:
            return self._complete_experimental(code, cursor_pos)
        except Exception:
            pass
        line, offset = _line_at_cursor(code, cursor_pos)
        txt, matches = self.shell.complete("", line, cursor_pos - offset)
        return {
            "matches": list(matches),
            "cursor_start": cursor_pos - len(txt),
            "cursor_end": cursor_pos,
            "metadata": {},
            "status": "ok",
        }

    def _complete_experimental(self, code, cursor_pos):
        from IPython.core.completer import provisionalcompleter, rectify_completions

        with provisionalcompleter():
            raw = self.shell.Completer.completions(code, cursor_pos)
            completions = list(rectify_completions(code, raw))
        comps = [
            {"start": c.start, "end": c.end, "text": c.text, "type": c.type,
             "signature": c.signature}
            for c in completions
        ]
        if completions:
            start, end = completions[0].start, completions[0].end
        else:
            start = end = cursor_pos
        return {
            "matches": [c.text for c in completions],
            "cursor_start": start,
            "cursor_end": end,
            "metadata": {"_jupyter_types_experimental": comps},
            "status": "ok",
        }

    def inspect(self, code, cursor_pos, detail_level, omit_sections):
        from IPython.utils.tokenutil import token_at_cursor

        name = token_at_cursor(code, cursor_pos)
        try:
            bundle = self.shell.object_inspect_mime(
                name, detail_level=detail_level, omit_sections=tuple(omit_sections)
            )
        except KeyError:
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        return {"status": "ok", "found": True, "data": dict(bundle), "metadata": {}}

    def is_complete(self, code):
        status, indent = self.shell.input_transformer_manager.check_complete(code)
        reply = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

    def history(self, hist_access_type, output=False, raw=True, session=0, start=0, stop=None,
                n=None, pattern=None, unique=False, **_):
        hm = self.shell.history_manager
        assert hm is not None
        hm.writeout_cache()
        if hist_access_type == "tail":
            hist = hm.get_tail(n or 10, raw=raw, output=output, include_latest=True)
        elif hist_access_type == "range":
            hist = hm.get_range(session, start or 0, stop, raw=raw, output=output)
        elif hist_access_type == "search":
            hist = hm.search(pattern or "*", raw=raw, output=output, n=n, unique=unique)
        else:
            hist = []
        rows = []
        for sess, line, entry in hist:
            if sess == 0:  # IPython numbers the current session 0 in ranges; say which it is
                sess = hm.session_number
            if isinstance(entry, tuple):  # (input, output); current-session outputs are objects
                src, out = entry
                entry = [src, out if out is None or isinstance(out, str) else repr(out)]
            rows.append([sess, line, entry])
        return {"status": "ok", "history": rows}


# ---------------------------------------------------------------------------------------------
# The main loop


def preimport(names):
    """Imports modules ahead of the first cell (into sys.modules only, not the user namespace).

    Used when the REPL is started ahead of time (a warm spare, or before a snapshot is taken), so
    the user's `import pandas` is instant. Failures are ignored: the user will see them on import.
    """
    import importlib

    for name in [n.strip() for n in names.split(",") if n.strip()]:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - including SystemExit from odd modules
            pass
    if "matplotlib.pyplot" in sys.modules:  # leave no figure from the import behind
        try:
            sys.modules["matplotlib.pyplot"].close("all")
        except Exception:
            pass


def warm_up_steps(executor):
    """The slow first-use paths (traceback formatting, completion, display formatting), so the
    first error, interrupt or Tab is fast; under TCG each costs seconds when cold."""

    def traceback_step():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            executor.format_exception(*sys.exc_info())

    # Jedi parses the typeshed stubs on first use: complete a module, a builtin and an attribute.
    return [traceback_step, lambda: executor.complete("import o", 8),
            lambda: executor.complete("pri", 3), lambda: executor.complete("'x'.up", 6),
            lambda: executor.format_value(1)]


def after_restore_steps(executor):
    """Right after a restore QEMU's translation cache is empty (under TCG), so the first cell
    runs several times slower than later ones. These steps take the paths a cell takes —
    parsing, transforming, compiling and running code, formatting a result, encoding a reply —
    without touching the user's namespace, history, execution count or output."""

    def reply_step():
        _ENCODER.encode({"type": "reply", "id": 0,
                         "content": {"status": "ok", "user_expressions": {}, "payload": []}})
        executor.user_expressions({})

    return [executor.warm_cell, lambda: executor.format_value(2), reply_step,
            lambda: __import__("sys")]


def run_quietly(step):
    try:
        step()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# Workspace: the REPL's cwd, kept in step with the notebook's directory by the host
# (supermachine_kernel/workspace/; the host side is kernel/workspace_hook.py)

WORKSPACE_FALLBACK = "~/workspace"  # when the REPL user cannot create the directory asked for
MAX_WORKSPACE_SOURCE = 1024 * 1024


class Workspace:
    """The workspace directory of this REPL: made and entered (the cwd of user code) when the
    host attaches it, watched with guest_side.Watcher (an inotify "dirty" flag), and listed
    with guest_side.list_tree after a cell only when something in it changed. The host sends
    guest_side.py's source with the attach (the same code its one-shot guest processes run);
    it is compiled once per source.

    `token` (made at the first attach) and `seq` (execute requests since) name the tree's
    lineage: a host attaching again (after an idle suspend or a %restore: the same process,
    restored) compares them with what it last knew, to tell the very tree it synced from an
    older one."""

    def __init__(self):
        self.side = {}  # guest_side.py's namespace
        self.digest = ""
        self.root = ""  # "" until attached
        self.watcher = None
        self.options: tuple = ([], True, 0)  # (excludes, hidden, max_entries)
        self.token = ""
        self.seq = 0
        self.send_back = True  # list after a cell that changed the tree (mode "sync" only)

    def attach(self, req):
        source = req.get("source")
        if not isinstance(source, str) or len(source) > MAX_WORKSPACE_SOURCE:
            raise ValueError("workspace attach needs guest_side.py's source")
        import hashlib

        digest = hashlib.sha256(source.encode()).hexdigest()
        if digest != self.digest:
            side = {"__name__": "supermachine_workspace"}
            exec(compile(source, "<supermachine workspace>", "exec"), side)
            self.side, self.digest = side, digest
        self.options = ([str(x) for x in req.get("excludes") or []], bool(req.get("hidden")),
                        int(req.get("max_entries") or 11000))
        self.send_back = bool(req.get("send_back", True))
        root = self._make(str(req.get("root") or "/workspace"))
        os.chdir(root)
        if self.watcher is not None:
            self.watcher.close()
        self.root = root
        self.watcher = self.side["Watcher"](root, self.options[0], self.options[1])
        if not self.token:
            self.token = os.urandom(8).hex()
        return {"status": "ok", "root": root, "listing": self.listing(), "token": self.token,
                "seq": self.seq}

    @staticmethod
    def _make(root):
        try:
            os.makedirs(root, exist_ok=True)
            if os.access(root, os.W_OK | os.X_OK):
                return root
        except OSError:
            pass
        fallback = os.path.expanduser(WORKSPACE_FALLBACK)
        os.makedirs(fallback, exist_ok=True)
        return fallback

    def listing(self):
        """The tree as guest_side's `list` prints it, or {"error": ...} when the directory
        is gone (never an empty listing: the host would take that for "all deleted")."""
        if not os.path.isdir(self.root):
            return {"error": "the workspace directory %s is gone" % self.root}
        return self.side["list_tree"](self.root, *self.options)

    def apply(self, req):
        if not self.root:
            raise ValueError("the workspace is not attached")
        ops = req.get("ops")
        if not isinstance(ops, dict):
            raise ValueError("workspace apply needs ops")
        return {"status": "ok", "failed": self.side["apply"](self.root, ops)["failed"]}

    def before_cell(self, req):
        """Counts the execute; "workspace_clean": the host's push just wrote into the
        workspace, and those changes are known to it."""
        self.seq += 1
        if self.watcher is not None and req.get("workspace_clean"):
            self.watcher.dirty()

    def after_cell(self, reply):
        """A listing in the execute reply only when the cell (or anything else) changed the
        workspace since the last one."""
        try:
            if self.watcher is not None and self.watcher.dirty() and self.send_back:
                reply["workspace"] = self.listing()
        except Exception as e:  # the cell's reply must still go out
            reply["workspace"] = {"error": "listing the workspace failed: %s" % e}


class Driver:
    def __init__(self, executor, comm_manager):
        self.executor = executor
        self.comm_manager = comm_manager
        self.warm_up = warm_up_steps(executor)  # run one at a time while no request waits
        self.attached = False  # a host just said hello
        self.workspace = Workspace()

    def send_ready(self):
        _send(
            {
                "type": "ready",
                "python_version": platform.python_version(),
                "implementation": platform.python_implementation(),
                "executor": self.executor.name,
                "banner": self.executor.banner(),
                "pid": os.getpid(),
                "comms": self.comm_manager is not None,
            }
        )

    def do_hello(self, req):
        """A host attaching to an already running REPL (warm spare, restored snapshot). With
        "idle": true nobody waits for a cell yet (a VM restored ahead of use): the warm-up
        starts at once instead of after WARM_UP_GRACE."""
        self.note_restore()
        self.attached = not req.get("idle")
        self.send_ready()

    def do_restored(self, req):
        """The agent's signal after a Hello (install_hello_notification): after a restore, the
        warm-up starts now, before any host attaches. No reply."""
        self.note_restore()
        return None

    def do_network(self, req):
        """The kernel's network settings (kernel/network.py), sent after every attach: the
        proxy variables for this process and its children. No reply."""
        env = req.get("env")
        set_network(env if isinstance(env, dict) else {}, req.get("ca"))
        return None

    def note_restore(self):
        """After a restore (first call since one): reseed, and queue the after-restore warm-up
        (next_request runs it between requests)."""
        if reseed_if_restored():
            self.warm_up = after_restore_steps(self.executor) + self.warm_up

    def serve(self):
        requests = state.channel.requests
        while True:
            try:
                req = self.next_request(requests)
            except KeyboardInterrupt:
                continue
            if req is None or req.get("type") == "shutdown":
                state.output.flush(fds=True)
                return
            self.handle(req)

    def next_request(self, requests):
        """The next request. While none waits, the warm-up steps run, one at a time, so a
        request waits at most for the step in progress; right after a host attached they
        start only if its first request does not follow within WARM_UP_GRACE seconds."""
        grace = WARM_UP_GRACE if self.attached else 0
        self.attached = False
        while self.warm_up:
            try:
                return requests.get(timeout=grace)
            except queue.Empty:
                grace = 0
            run_quietly(self.warm_up.pop(0))
            state.output.flush(fds=True)
        return requests.get()

    def handle(self, req):
        kind = req.get("type")
        rid = req.get("id")
        handler = getattr(self, "do_" + str(kind), None)
        try:
            if handler is None:
                content = {"status": "error", "ename": "ValueError",
                           "evalue": "unknown request %r" % kind, "traceback": []}
            else:
                content = handler(req)
        except KeyboardInterrupt:
            content = {"status": "error", "ename": "KeyboardInterrupt", "evalue": "",
                       "traceback": []}
        except Exception as e:  # a driver bug must not kill the session
            content = {"status": "error", "ename": type(e).__name__, "evalue": str(e),
                       "traceback": traceback.format_exc().splitlines()}
        if kind != "execute":  # (do_execute flushes before it builds its reply)
            # What the handler printed leaves before the reply: the host publishes idle for
            # the request once the reply is in.
            state.output.flush(fds=True)
        if rid is not None:
            try:
                _send({"type": "reply", "id": rid, "content": content})
            except ValueError as e:  # unserializable reply: say so instead of hanging the host
                _send({"type": "reply", "id": rid,
                       "content": {"status": "error", "ename": "ValueError", "evalue": str(e),
                                   "traceback": []}})

    def do_execute(self, req):
        ex = self.executor
        silent = bool(req.get("silent"))
        store_history = bool(req.get("store_history", not silent))
        if "execution_count" in req:
            ex.execution_count = int(req["execution_count"])
        begin_input(bool(req.get("allow_stdin")))
        state.parent = _parent_of(req)
        reseed_if_restored()
        self.workspace.before_cell(req)
        error = None
        state.executing = True
        try:
            error = ex.run(str(req.get("code", "")), silent, store_history)
        except KeyboardInterrupt:
            error = {"ename": "KeyboardInterrupt", "evalue": "", "traceback": ["KeyboardInterrupt"]}
            _send(dict(error, type="error"))
        finally:
            state.executing = False
            end_input()
        state.output.flush(fds=True)
        if error is None:
            reply = {"status": "ok",
                     "user_expressions": ex.user_expressions(req.get("user_expressions") or {})}
        else:
            reply = {"status": "error", "user_expressions": {}}
            reply.update(error)
        take = getattr(ex, "take_payload", None)
        reply["payload"] = take() if take else []
        self.workspace.after_cell(reply)
        return reply

    def do_workspace(self, req):
        """The host's workspace requests: {"op": "attach", "root", "source", "excludes",
        "hidden", "max_entries", "send_back"} -> {"root", "listing", "token", "seq"};
        {"op": "apply", "ops"} -> {"failed"}."""
        op = req.get("op")
        if op == "attach":
            return self.workspace.attach(req)
        if op == "apply":
            return self.workspace.apply(req)
        raise ValueError("unknown workspace op %r" % (op,))

    def do_complete(self, req):
        code = str(req.get("code", ""))
        pos = req.get("cursor_pos")
        return self.executor.complete(code, len(code) if pos is None else int(pos))

    def do_inspect(self, req):
        code = str(req.get("code", ""))
        pos = req.get("cursor_pos")
        return self.executor.inspect(code, len(code) if pos is None else int(pos),
                                     int(req.get("detail_level") or 0),
                                     req.get("omit_sections") or ())

    def do_is_complete(self, req):
        return self.executor.is_complete(str(req.get("code", "")))

    def do_history(self, req):
        args = {k: v for k, v in req.items() if k not in ("type", "id")}
        args.setdefault("hist_access_type", "tail")
        return self.executor.history(**args)

    def do_comm_info(self, req):
        target = req.get("target_name")
        comms = {}
        if self.comm_manager is not None:
            for cid, c in self.comm_manager.comms.items():
                if target is None or c.target_name == target:
                    comms[cid] = {"target_name": c.target_name}
        return {"status": "ok", "comms": comms}

    def _comm(self, req):
        """A frontend's comm_open/comm_msg/comm_close, handled by the comm manager (widget
        callbacks run here, with the comm message as the current request); answered once
        the handler returned and its output was sent (handle() flushes before the reply)."""
        if self.comm_manager is None:
            if req["type"] == "comm_open":  # nobody here to talk to: close it again
                _send({"type": "comm_close", "comm_id": req.get("comm_id"), "data": {},
                       "metadata": {}, "buffers": []})
            return {"status": "ok"}
        handler = getattr(self.comm_manager, req["type"])
        state.parent = _parent_of(req)
        state.executing = True  # widget callbacks are user code: interruptible
        try:
            handler(None, None, _comm_message(req))
        finally:
            state.executing = False
        return {"status": "ok"}

    do_comm_open = do_comm_msg = do_comm_close = _comm


def user_scripts_on_path():
    """A user who is not root installs with pip's user scheme (`%pip install` lands in
    ~/.local); its command-line tools go to the user base's bin, which `!cmd` should find."""
    if os.geteuid() == 0:
        return
    import site

    scripts = os.path.join(site.getuserbase(), "bin")
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if scripts not in parts:
        os.environ["PATH"] = os.pathsep.join([scripts, *[p for p in parts if p]])


def main():
    keep_freed_memory()
    user_scripts_on_path()
    # Keep the protocol on private fds; user code and subprocesses get /dev/null, pipes.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    diag = os.dup(2)  # the driver's own diagnostics still reach the host's stderr reader
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    channel = Channel(proto_in, proto_out)
    output = Output(channel)
    state.channel = channel
    state.output = output
    output.capture_fds()
    sys.stdin = open(os.devnull)
    sys.stdout = TextStream(output.stdout, 1)
    sys.stderr = TextStream(output.stderr, 2)
    sys.__stderr__ = os.fdopen(diag, "w", buffering=1)  # type: ignore[misc]  # Final in typeshed

    signal.signal(signal.SIGINT, _ignore_sigint)
    install_hello_notification()
    state.generation_stamp = _generation_stamp()
    state.generation = _read_generation()

    builtins.input = guest_input
    import getpass

    getpass.getpass = guest_getpass

    comm_manager = install_comm()
    executor: IPythonExecutor | PlainExecutor
    try:
        executor = IPythonExecutor()
    except ImportError:
        executor = PlainExecutor()
    else:
        bound_output_history(executor.shell)
    builtins.input = guest_input  # IPython may have swapped it while starting
    if comm_manager is not None:
        try:
            import IPython  # noqa: F401 - ipywidgets registers its targets if IPython is running

            if "ipywidgets" in sys.modules:
                sys.modules["ipywidgets"].register_comm_target()
        except Exception:
            pass
    output.flush(fds=True)

    driver = Driver(executor, comm_manager)
    ahead = os.environ.get("SUPERMACHINE_REPL_PREIMPORT")
    if ahead is not None:  # started ahead of time: nobody is waiting, be completely warm
        preimport(ahead)
        for step in driver.warm_up:
            run_quietly(step)
        driver.warm_up = []
    output.flush(fds=True)
    channel.start_reading()
    driver.send_ready()
    driver.serve()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
