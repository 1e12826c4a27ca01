"""atheris harness for the host's parser of guest REPL frames (`supermachine_kernel/repl_client/frames.py`).

Not a pytest test: `tools/fuzz.py` runs it (`make fuzz`; the smoke in tests/security/test_fuzz_smoke.py).
Run by hand: `.venv/bin/python tests/fuzz/fuzz_frames.py CORPUS_DIR tests/fuzz/seeds/frames -max_total_time=60`.

The input is what a hostile guest writes on the REPL's pipe, cut into chunks at input-chosen
points (byte 0: the number of cut points, 0-4, then one byte each; the rest is the stream, so a
seed is a 0 byte and then frames). What must hold, else the fuzzer stops with the input that broke it:
- only `ProtocolError` escapes the decoder and the validators (no RecursionError, KeyError, ...);
- the frames decoded, and the error that ends them, do not depend on how the bytes were chunked
  (`iter_sized`, as the session reads, yields every good frame before a framing error);
- every frame is an object with a string "type", within the cap, and every string in it
  encodes as UTF-8 (what jupyter_client's packer needs);
- a decoded JSON frame re-encodes (`encode_frame`) and decodes to the same object;
- `validate_event` and, for replies, `validate_reply` of every request kind return plain
  JSON-serialisable data or raise `ProtocolError`.
"""
from __future__ import annotations

import json
import sys

import atheris

# Coverage of the parser only (its package's other modules, asyncio and friends stay plain).
with atheris.instrument_imports(include=["supermachine_kernel.repl_client.frames"]):
    from supermachine_kernel.repl_client import frames

# A small cap, so the fuzzer reaches the oversized-frame path with small inputs.
MAX_FRAME = 4096
REQUESTS = (
    "execute", "complete", "inspect", "is_complete", "history", "comm_info", "workspace",
    "comm_open", "comm_msg", "comm_close", "kernel_info",
)


def _strings_encodable(value: object) -> None:
    """Every string in `value` (keys too) encodes as strict UTF-8; iterative (any depth)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            v.encode("utf-8")
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)


def _same_json(a: object, b: object) -> bool:
    # NaN != NaN, so compare the canonical encodings.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _decode(chunks: list[bytes]) -> tuple[list[tuple[int, dict]], str | None]:
    """Frames decoded from `chunks` fed one by one, and the ProtocolError that stopped it, if any."""
    decoder = frames.FrameDecoder(max_frame=MAX_FRAME)
    out: list[tuple[int, dict]] = []
    try:
        for chunk in chunks:
            for sized in decoder.iter_sized(chunk):
                out.append(sized)
    except frames.ProtocolError as e:
        return out, str(e)
    return out, None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    # Byte 0 says how many cut points follow (0-4), each a position in 256ths of the stream.
    n = data[0] % 5
    cuts = sorted(data[1 : 1 + n])
    stream = bytes(data[1 + n :])
    if stream[:1] == b"{":
        # Guide the fuzzer to JSON bodies too: a '{'-led stream becomes one well-framed frame.
        stream = frames.HEADER.pack(len(stream)) + stream
    bounds = [0] + [min(c * len(stream) // 256, len(stream)) for c in cuts] + [len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]

    got, err = _decode(chunks)
    whole, whole_err = _decode([stream])
    assert err == whole_err, (err, whole_err)
    assert len(got) == len(whole), (len(got), len(whole))
    assert all(_same_json(a[1], b[1]) for a, b in zip(got, whole))

    for size, msg in got:
        assert size <= MAX_FRAME
        assert isinstance(msg, dict) and isinstance(msg.get("type"), str)
        _strings_encodable(msg)
        if msg["type"] != "stream" or set(msg) != {"type", "name", "text"}:
            again = frames.FrameDecoder(max_frame=MAX_FRAME).feed(frames.encode_frame(msg))
            assert len(again) == 1 and _same_json(again[0], msg), (msg, again)
        try:
            kind, content, buffers = frames.validate_event(msg)
        except frames.ProtocolError:
            continue
        assert kind == msg["type"] and isinstance(content, dict)
        assert all(isinstance(b, bytes) for b in buffers)
        json.dumps(content)
        if kind == "reply":
            for request in REQUESTS:
                try:
                    reply = frames.validate_reply(request, content["content"])
                except frames.ProtocolError:
                    continue
                assert isinstance(reply, dict) and reply.get("status") in (
                    "ok", "error", "aborted", "complete", "incomplete", "invalid", "unknown",
                ) or request == "workspace", (request, reply)
                json.dumps(reply)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
