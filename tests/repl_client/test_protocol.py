"""The host's guest-frame codec and validators: round trips, caps, and garbage handling."""
from __future__ import annotations

import json
import random
import struct

import pytest

from supermachine_kernel.repl_client.frames import (
    MAX_FRAME_BYTES,
    RAW_STREAM,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    validate_event,
    validate_mimebundle,
    validate_reply,
)


def frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def test_roundtrip_and_split_feeding():
    msgs = [{"type": "stream", "name": "stdout", "text": "héllo" * i} for i in range(5)]
    data = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(data), 3):
        got += dec.feed(data[i:i + 3])
    assert got == msgs
    assert dec.pending == 0


def test_oversized_frame_is_rejected_before_buffering():
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(struct.pack(">I", 1025))
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize("body", [b"\xff\xfe", b"not json", b"[1,2]", b'{"no_type": 1}', b'{"type": 5}'])
def test_undecodable_bodies(body):
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


@pytest.mark.parametrize("bundle", [
    {"text/plain": 5},
    {"noslash": "x"},
    {"image/png": {"a": 1}},
    [("text/plain", "x")],
    "text",
])
def test_bad_mimebundles(bundle):
    with pytest.raises(ProtocolError):
        validate_mimebundle(bundle)


def test_good_mimebundles():
    validate_mimebundle({"text/plain": "x", "application/json": {"a": [1]},
                         "application/vnd.jupyter.widget-view+json": {"model_id": "m"},
                         "text/html": ["<b>", "x</b>"]})


@pytest.mark.parametrize("msg", [
    {"type": "stream", "name": "stdin", "text": "x"},
    {"type": "stream", "name": "stdout", "text": 3},
    {"type": "display_data", "data": {"text/plain": 1}},
    {"type": "update_display_data", "data": {}, "transient": {}},
    {"type": "execute_result", "data": {}, "execution_count": "1"},
    {"type": "error", "ename": "E", "traceback": [1]},
    {"type": "comm_msg", "comm_id": "c", "buffers": ["!!!not base64"]},
    {"type": "comm_msg", "comm_id": "c", "buffers": ["AA=="] * 1000},
    {"type": "comm_open", "comm_id": "c"},
    {"type": "reply", "id": "1", "content": {}},
    {"type": "launch_missiles"},
])
def test_invalid_events(msg):
    with pytest.raises(ProtocolError):
        validate_event(msg)


def test_valid_events():
    kind, content, buffers = validate_event(
        {"type": "comm_msg", "comm_id": "c", "data": {"a": 1}, "metadata": {"m": 1},
         "buffers": ["AAE="]})
    assert kind == "comm_msg"
    assert content == {"comm_id": "c", "data": {"a": 1}, "__metadata__": {"m": 1}}
    assert buffers == [b"\x00\x01"]
    kind, content, _ = validate_event({"type": "update_display_data", "data": {"text/plain": "x"},
                                       "transient": {"display_id": "d"}})
    assert content["transient"] == {"display_id": "d"}


def test_replies():
    assert validate_reply("execute", {"status": "ok", "payload": [], "user_expressions": {}}) == {
        "status": "ok", "payload": [], "user_expressions": {}}
    err = validate_reply("execute", {"status": "error", "ename": "E", "evalue": "v",
                                     "traceback": ["t"]})
    assert err["ename"] == "E" and err["status"] == "error"
    assert validate_reply("is_complete", {"status": "incomplete", "indent": "  "}) == {
        "status": "incomplete", "indent": "  "}
    with pytest.raises(ProtocolError):
        validate_reply("is_complete", {"status": "maybe"})
    with pytest.raises(ProtocolError):
        validate_reply("complete", {"status": "ok", "matches": [1], "cursor_start": 0,
                                    "cursor_end": 0})
    with pytest.raises(ProtocolError):
        validate_reply("history", {"status": "ok", "history": [[1, 2]]})
    with pytest.raises(ProtocolError):
        validate_reply("execute", {"status": "ok", "payload": [{"source": "page", "data": 3}]})


def test_comm_replies():
    """A comm request's reply only says the handler ran; an empty one (a REPL from an older
    snapshot) counts as ok, a failing handler as an error."""
    for kind in ("comm_open", "comm_msg", "comm_close"):
        assert validate_reply(kind, {"status": "ok"}) == {"status": "ok"}
        assert validate_reply(kind, {}) == {"status": "ok"}
        err = validate_reply(kind, {"status": "error", "ename": "KeyboardInterrupt",
                                    "evalue": "", "traceback": []})
        assert err["status"] == "error" and err["ename"] == "KeyboardInterrupt"
        with pytest.raises(ProtocolError):
            validate_reply(kind, {"status": "aborted"})


def test_fuzz_only_protocol_errors():
    """Random bytes and random JSON never raise anything but ProtocolError."""
    rng = random.Random(1234)
    atoms = [None, True, 1, -1.5, "x", "text/plain", "stream", "reply", [], {}, ["a"], {"a": "b"}]
    keys = ["type", "name", "text", "data", "metadata", "transient", "comm_id", "buffers", "id",
            "content", "execution_count", "ename", "evalue", "traceback", "target_name", "wait"]
    for _ in range(3000):
        dec = FrameDecoder(max_frame=4096)
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        try:
            for m in dec.feed(blob):
                validate_event(m)
        except ProtocolError:
            pass
        obj = {k: rng.choice(atoms) for k in rng.sample(keys, rng.randrange(len(keys)))}
        obj["type"] = rng.choice(["stream", "display_data", "update_display_data", "execute_result",
                                  "clear_output", "error", "input_request", "comm_open",
                                  "comm_msg", "comm_close", "ready", "reply", "zzz"])
        try:
            validate_event(obj)
        except ProtocolError:
            pass
        for req in ("execute", "complete", "inspect", "is_complete", "history", "comm_info"):
            try:
                validate_reply(req, {k: rng.choice(atoms) for k in ("status", "matches", "data",
                                                                    "history", "payload")})
            except ProtocolError:
                pass


def _packable(obj) -> None:
    """What jupyter_client's packer does with a message's parts: strict UTF-8."""
    json.dumps(obj, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("msg", [
    {"type": "stream", "name": "stdout", "text": "A\ud800B\n"},
    {"type": "error", "ename": "Val\udc80Error", "evalue": "bad \ud800 value",
     "traceback": ["line \udfff"]},
    {"type": "display_data", "data": {"text/plain": "x\ud800"},
     "metadata": {"k\udc00": ["v\ud800"]}, "transient": {}},
    {"type": "comm_msg", "comm_id": "c", "data": {"nested": [{"deep": "\ud800"}]}},
    {"type": "ready", "python_version": "3.11\ud800", "banner": "Python \udc80"},
    {"type": "reply", "id": 1, "content": {"status": "ok", "matches": ["a\ud800"],
                                           "cursor_start": 0, "cursor_end": 1, "metadata": {}}},
])
def test_lone_surrogates_become_replacement_characters(msg):
    data = encode_frame(msg)  # the guest's encoder escapes them as \udXXX, as json does
    [got] = FrameDecoder().feed(data)
    _packable(got)
    text = json.dumps(got, ensure_ascii=False)
    assert "\ufffd" in text
    # Nothing else changes: same shape, same other characters.
    assert json.loads(json.dumps(msg).replace("\\ud800", "\\ufffd").replace("\\udc80", "\\ufffd")
                      .replace("\\udfff", "\\ufffd").replace("\\udc00", "\\ufffd")) == got
    validate_event(got)


def test_surrogate_pairs_stay_one_character():
    [got] = FrameDecoder().feed(encode_frame({"type": "stream", "name": "stdout",
                                              "text": "smile \U0001F600 \ud83d"}))
    assert got["text"] == "smile \U0001F600 \ufffd"


def test_deeply_nested_frame_is_a_protocol_error():
    body = b'{"type":"comm_msg","data":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(ProtocolError, match="nests deeper than 128 levels"):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def raw(stream: int, body: bytes) -> bytes:
    return struct.pack(">I", RAW_STREAM | (len(body) + 1)) + bytes([stream]) + body


def test_raw_stream_frames_between_json_frames_and_split_anywhere():
    data = (raw(1, "héllo €😀\n".encode()) + encode_frame({"type": "clear_output", "wait": False})
            + raw(2, b"err\n") + raw(1, b""))
    expected = [{"type": "stream", "name": "stdout", "text": "héllo €😀\n"},
                {"type": "clear_output", "wait": False},
                {"type": "stream", "name": "stderr", "text": "err\n"},
                {"type": "stream", "name": "stdout", "text": ""}]
    for step in (1, 2, 5, len(data)):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(data), step):
            got += dec.feed_sized(data[i:i + step])
        assert [m for _, m in got] == expected
        assert [size for size, _ in got][0] == len("héllo €😀\n".encode()) + 1
        assert dec.pending == 0


def test_raw_stream_text_that_is_not_utf8_is_replaced_not_fatal():
    [msg] = FrameDecoder().feed(raw(1, b"a\xffb\xed\xa0\x80c"))
    assert msg["text"].startswith("a\ufffdb\ufffd") and msg["text"].endswith("c")
    msg["text"].encode("utf-8")  # no lone surrogate reaches the Jupyter message


@pytest.mark.parametrize("data, error", [
    (raw(3, b"x"), "names stream 3"),
    (struct.pack(">I", RAW_STREAM), "without its stream byte"),
    (struct.pack(">I", RAW_STREAM | (MAX_FRAME_BYTES + 1)), "exceeds"),
])
def test_bad_raw_frames_are_framing_errors(data, error):
    with pytest.raises(ProtocolError, match=error):
        FrameDecoder().feed(data)


def test_a_prestarted_repl_that_prints_before_ready_is_reported_as_such():
    from supermachine_kernel.repl_client.backend import read_ready_frame

    class Child:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read_stdout(self, n: int, timeout: float | None = None) -> bytes:
            chunk, self.data = self.data[:n], self.data[n:]
            return chunk

    ready = {"type": "ready", "python_version": "3.11"}
    assert read_ready_frame(Child(encode_frame(ready)), timeout=5) == ready
    with pytest.raises(ProtocolError, match="stream output first"):
        read_ready_frame(Child(raw(2, b"warning\n") + encode_frame(ready)), timeout=5)
