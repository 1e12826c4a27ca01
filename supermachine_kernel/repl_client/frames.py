"""Frames between the host session and the guest REPL driver: codec and validation (pure, no I/O).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
object with a "type" key (the guest side of this lives in `guest/repl.py`, which must stay
stdlib-only and so repeats the few lines of encoding). The guest sends stream text as *raw*
frames: the length has its top bit set (`RAW_STREAM`) and the body is one byte naming the
stream (1 stdout, 2 stderr) and then the text in UTF-8, decoded here with invalid bytes
replaced; they become the same `{"type": "stream", "name", "text"}` objects as JSON frames.

Everything the guest sends is untrusted. `FrameDecoder` caps every frame (`MAX_FRAME_BYTES`);
`validate_event` / `validate_reply` turn a decoded object into the shape the kernel publishes or
raise `ProtocolError` with a message that names what was wrong. A framing error (oversized or
undecodable frame, or JSON nested deeper than `MAX_JSON_DEPTH`) leaves the stream unsynchronised,
so the session treats it as fatal for that guest; a frame that decodes but fails validation is
dropped on its own. The depth bound is checked before decoding: the decoder itself would accept
nearly the interpreter's recursion limit, and every later recursive step (Jupyter's JSON packer,
a frontend) could then fail on what it accepted.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import struct
from typing import Any, Iterator

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 32 * 1024 * 1024
RAW_STREAM = 0x80000000
RAW_STREAM_NAMES = {1: "stdout", 2: "stderr"}
MAX_BUFFERS = 64
#: Deepest nesting of arrays and objects a guest frame may have (serde_json's default limit too).
MAX_JSON_DEPTH = 128


class ProtocolError(ValueError):
    """The guest sent something this host does not accept."""


def encode_frame(msg: dict[str, Any]) -> bytes:
    """One host -> guest frame. `msg` must be JSON-serialisable."""
    body = json.dumps(msg, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: `feed(bytes)` returns the complete frames so far, as dicts.

    `iter_sized(bytes)` yields them one at a time, so a reader hands on every good frame that
    came before a bad one in the same read (the output a cell printed before its guest broke the
    framing) before the `ProtocolError` reaches it; `feed` raises without them."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._need: int | None = None
        self._raw = False
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return [msg for _, msg in self.feed_sized(data)]

    def feed_sized(self, data: bytes) -> list[tuple[int, dict[str, Any]]]:
        """Like `feed`, with each frame's encoded size (for memory accounting)."""
        return list(self.iter_sized(data))

    def iter_sized(self, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
        """The frames `data` completes, each with its encoded size, as they are decoded; a
        framing error is raised after the good frames before it. Consume it to the end (or to
        the error): the decoder's state advances as it goes."""
        buf = self._buf
        buf += data
        while True:
            if self._need is None:
                if len(buf) < HEADER.size:
                    break
                (size,) = HEADER.unpack_from(buf)
                self._raw = bool(size & RAW_STREAM)
                size &= ~RAW_STREAM
                if size > self._max:
                    raise ProtocolError(
                        f"guest frame of {size} bytes exceeds the {self._max}-byte limit"
                    )
                if self._raw and size < 1:
                    raise ProtocolError("raw stream frame without its stream byte")
                del buf[: HEADER.size]
                self._need = size
            need = self._need
            if len(buf) < need:
                break
            if self._raw:
                msg = _raw_stream(buf, need)
            else:
                with memoryview(buf) as view:
                    body = bytes(view[:need])
                msg = decode_body(body)
            del buf[:need]
            self._need = None
            yield need, msg

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still held."""
        return len(self._buf)

    @property
    def announced(self) -> int | None:
        """The body size the incomplete frame's header announced (None: no whole header)."""
        return self._need


def _raw_stream(buf: bytearray, size: int) -> dict[str, Any]:
    """The stream message of a raw frame whose body is `buf[:size]`."""
    name = RAW_STREAM_NAMES.get(buf[0])
    if name is None:
        raise ProtocolError(f"raw stream frame names stream {buf[0]}, not 1 (stdout) or 2 (stderr)")
    with memoryview(buf) as view:
        text = str(view[1:size], "utf-8", "replace")
    return {"type": "stream", "name": name, "text": text}


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame's JSON object, with every string in it (keys too) encodable as UTF-8.

    This is the one place where text from the guest enters the host, so it is also where lone
    surrogates are made harmless. Python strings may hold them (`'\\ud800'`, a file name decoded
    with surrogateescape) and JSON can carry them as `\\udXXX` escapes, but a Jupyter message
    cannot: jupyter_client's packer would raise and the message (a stream batch, an error, a
    reply) would be lost. Each lone surrogate becomes U+FFFD, the replacement character."""
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise ProtocolError(f"its JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"guest frame is not UTF-8 JSON: {e}") from None
    except RecursionError:  # not reached after the depth check; kept as its backstop
        raise ProtocolError(f"its JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("guest frame is not an object with a string 'type'")
    # Strict UTF-8 cannot encode a surrogate, so a lone one can only arrive as an escape.
    if b"\\ud" in body or b"\\uD" in body:
        msg = make_encodable(msg)
    return msg


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")  # depth does not depend on the bracket's kind


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when the JSON text `body` nests arrays/objects more than `limit` deep (brackets in
    strings do not count); False also for malformed text, which the decoder then reports.
    Every step is a C-speed bytes operation: nearly every frame holds at most `limit` opening
    brackets and costs two counts."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Drop string contents: escaped backslashes, then escaped quotes (left to right, as JSON
    # reads them; outside strings valid JSON has no backslash), then every other stretch
    # between two quotes. What is left outside strings is reduced to its brackets, all `[]`.
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = b"".join(text.split(b'"')[::2]).translate(_ONE_KIND, _NOT_BRACKETS)
    # Each pass removes the innermost pairs, i.e. one level: a few such passes (C speed) shrink
    # a wide structure; then the depth is summed over runs of one kind of bracket, which a deep
    # chain has few of. Linear in the frame's size either way.
    if b"[" * (limit + 1) in structure:  # a plain chain, the usual attack
        return True
    passes = 0
    while passes < min(limit, _STRIP_PASSES) and structure:
        shorter = structure.replace(b"[]", b"")
        if len(shorter) == len(structure):
            return False  # unbalanced: not JSON
        structure = shorter
        passes += 1
    if not structure:
        return False
    runs = _BRACKET_RUN.findall(structure)
    steps = (len(r) if r[0] == 0x5B else -len(r) for r in runs)  # [ opens, ] closes
    return passes + max(itertools.accumulate(steps)) > limit


_STRIP_PASSES = 8
_BRACKET_RUN = re.compile(rb"\[+|\]+")


_SURROGATE = re.compile("[\ud800-\udfff]")


def make_encodable(value: Any) -> Any:
    """`value` (decoded JSON) with each lone surrogate in its strings replaced by U+FFFD.
    (A valid pair has already been joined into one character by the JSON decoder.)
    Iterative, so any depth the decoder accepted is fine."""
    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return _SURROGATE.sub("\ufffd", v)
        if isinstance(v, dict):
            out: dict = {}
            pending.append((v, out))
            return out
        if isinstance(v, list):
            out_list: list = []
            pending.append((v, out_list))
            return out_list
        return v

    pending: list[tuple[Any, Any]] = []
    root = clean(value)
    while pending:
        source, target = pending.pop()
        if isinstance(source, dict):
            for k, v in source.items():
                target[clean(k)] = clean(v)
        else:
            target.extend(clean(v) for v in source)
    return root


# --- validation ------------------------------------------------------------------------------


def _str(msg: dict, key: str, default: str | None = None) -> str:
    value = msg.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _dict(msg: dict, key: str) -> dict:
    value = msg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"'{key}' must be an object, got {type(value).__name__}")
    return value


def _bool(msg: dict, key: str, default: bool = False) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be a boolean")
    return value


def _int(msg: dict, key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be an integer")
    return value


def _str_list(msg: dict, key: str) -> list[str]:
    value = msg.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"'{key}' must be a list of strings")
    return value


def validate_mimebundle(data: Any, what: str = "data") -> dict[str, Any]:
    """A mimebundle: {"type/subtype": str | JSON}. JSON values only for JSON mimetypes."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a mimebundle object, got {type(data).__name__}")
    for mime, value in data.items():
        if "/" not in mime or len(mime) > 255:
            raise ProtocolError(f"{what} has an invalid mimetype {mime[:80]!r}")
        if isinstance(value, str):
            continue
        if mime == "application/json" or mime.endswith("+json"):
            continue  # any JSON value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue  # multiline string, as nbformat stores them
        raise ProtocolError(f"{what}[{mime!r}] must be a string, got {type(value).__name__}")
    return data


def decode_buffers(msg: dict) -> list[bytes]:
    raw = msg.get("buffers") or []
    if not isinstance(raw, list) or len(raw) > MAX_BUFFERS:
        raise ProtocolError("'buffers' must be a list of at most %d base64 strings" % MAX_BUFFERS)
    out = []
    for b in raw:
        if not isinstance(b, str):
            raise ProtocolError("'buffers' must hold base64 strings")
        try:
            out.append(base64.b64decode(b, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError("a comm buffer is not valid base64") from None
    return out


EVENT_TYPES = {
    "ready", "stream", "display_data", "update_display_data", "execute_result", "clear_output",
    "error", "input_request", "comm_open", "comm_msg", "comm_close", "reply",
}


def validate_event(msg: dict[str, Any]) -> tuple[str, dict[str, Any], list[bytes]]:
    """Checks one decoded guest frame. Returns (type, Jupyter message content, buffers)."""
    kind = msg["type"]
    if kind not in EVENT_TYPES:
        raise ProtocolError(f"unknown guest message type {kind[:40]!r}")
    if kind == "stream":
        name = _str(msg, "name")
        if name not in ("stdout", "stderr"):
            raise ProtocolError(f"stream name must be stdout or stderr, got {name[:40]!r}")
        return kind, {"name": name, "text": _str(msg, "text")}, []
    if kind in ("display_data", "update_display_data"):
        content: dict[str, Any] = {
            "data": validate_mimebundle(msg.get("data")),
            "metadata": _dict(msg, "metadata"),
            "transient": _dict(msg, "transient"),
        }
        if kind == "update_display_data" and not isinstance(
            content["transient"].get("display_id"), str
        ):
            raise ProtocolError("update_display_data needs transient.display_id")
        return kind, content, []
    if kind == "execute_result":
        return kind, {
            "data": validate_mimebundle(msg.get("data")),
            "metadata": _dict(msg, "metadata"),
            "execution_count": _int(msg, "execution_count"),
        }, []
    if kind == "clear_output":
        return kind, {"wait": _bool(msg, "wait")}, []
    if kind == "error":
        return kind, {
            "ename": _str(msg, "ename"),
            "evalue": _str(msg, "evalue", ""),
            "traceback": _str_list(msg, "traceback"),
        }, []
    if kind == "input_request":
        return kind, {"prompt": _str(msg, "prompt", ""), "password": _bool(msg, "password")}, []
    if kind in ("comm_open", "comm_msg", "comm_close"):
        content = {"comm_id": _str(msg, "comm_id"), "data": _dict(msg, "data")}
        if kind == "comm_open":
            content["target_name"] = _str(msg, "target_name")
            module = msg.get("target_module")
            if module is not None:
                content["target_module"] = _str(msg, "target_module")
        # Comm metadata goes in the Jupyter message's metadata, not its content.
        content["__metadata__"] = _dict(msg, "metadata")
        return kind, content, decode_buffers(msg)
    if kind == "ready":
        return kind, {
            "python_version": _str(msg, "python_version"),
            "implementation": _str(msg, "implementation", "CPython"),
            "executor": _str(msg, "executor", "plain"),
            "banner": _str(msg, "banner", ""),
            "comms": _bool(msg, "comms"),
        }, []
    # reply
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError("reply 'id' must be an integer")
    return kind, {"id": rid, "content": _dict(msg, "content")}, []


# --- replies, per request -------------------------------------------------------------------


def _error_fields(content: dict) -> dict:
    return {
        "status": "error",
        "ename": _str(content, "ename", "Error"),
        "evalue": _str(content, "evalue", ""),
        "traceback": _str_list(content, "traceback"),
    }


def validate_reply(request: str, content: dict[str, Any]) -> dict[str, Any]:
    """Checks the content of a guest reply to `request` and returns a clean copy."""
    status = content.get("status")
    if request == "is_complete":
        if status not in ("complete", "incomplete", "invalid", "unknown"):
            raise ProtocolError("is_complete status must be complete, incomplete, invalid or unknown")
        reply = {"status": status}
        if "indent" in content:
            reply["indent"] = _str(content, "indent")
        return reply
    if status == "error" and request != "execute":
        return _error_fields(content)
    if request == "execute":
        if status not in ("ok", "error", "aborted"):
            raise ProtocolError("execute reply status must be ok, error or aborted")
        out: dict[str, Any] = _error_fields(content) if status == "error" else {"status": status}
        user_expressions = _dict(content, "user_expressions")
        for key, value in user_expressions.items():
            if not isinstance(value, dict):
                raise ProtocolError("user_expressions values must be objects")
            if "data" in value:
                validate_mimebundle(value["data"], f"user_expressions[{key!r}]")
        out["user_expressions"] = user_expressions
        payload = content.get("payload", [])
        if not isinstance(payload, list) or not all(isinstance(p, dict) for p in payload):
            raise ProtocolError("payload must be a list of objects")
        for p in payload:
            if p.get("source") == "page":
                validate_mimebundle(p.get("data"), "page payload")
        out["payload"] = payload
        if "workspace" in content:  # the guest's workspace listing: workspace/transfer.py parses it
            out["workspace"] = content["workspace"]
        return out
    if request in ("comm_open", "comm_msg", "comm_close") and status in (None, "ok"):
        # Answered once the guest's handler ran and its output was sent; nothing to return.
        # (A REPL from an older snapshot answers with an empty content.)
        return {"status": "ok"}
    if status != "ok":
        raise ProtocolError(f"{request} reply status must be ok or error")
    if request == "complete":
        matches = _str_list(content, "matches")
        return {
            "status": "ok",
            "matches": matches,
            "cursor_start": _int(content, "cursor_start"),
            "cursor_end": _int(content, "cursor_end"),
            "metadata": _dict(content, "metadata"),
        }
    if request == "inspect":
        return {
            "status": "ok",
            "found": _bool(content, "found"),
            "data": validate_mimebundle(content.get("data", {})),
            "metadata": _dict(content, "metadata"),
        }
    if request == "history":
        history = content.get("history", [])
        if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 3 for h in history
        ):
            raise ProtocolError("history must be a list of [session, line, entry] triples")
        return {"status": "ok", "history": history}
    if request == "workspace":  # workspace/transfer.py checks its fields (parse_attach)
        return dict(content)
    if request == "comm_info":
        comms = _dict(content, "comms")
        for value in comms.values():
            if not isinstance(value, dict) or not isinstance(value.get("target_name"), str):
                raise ProtocolError("comm_info comms must map ids to {target_name}")
        return {"status": "ok", "comms": comms}
    raise ProtocolError(f"no reply expected for {request!r}")

