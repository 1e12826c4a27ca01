"""Deeply nested JSON from the guest REPL: refused as an invalid frame naming the depth bound,
never a RecursionError in the death reason (issue 16 item 5). The guest is a fake driver on the
local backend, as in tests/repl_client/test_hostile_guest.py; the bound is in
`repl_client/frames.py`."""
from __future__ import annotations

import asyncio
import json
import struct
import textwrap

import pytest

from supermachine_kernel.repl_client import GuestDied, GuestRepl, guest_environment
from supermachine_kernel.repl_client.frames import (
    MAX_JSON_DEPTH,
    FrameDecoder,
    ProtocolError,
    json_depth_exceeds,
)
from supermachine_kernel.repl_client.local import LocalBackend

DRIVER = textwrap.dedent("""
    import os, struct, time
    out = os.dup(1)
    def send(body):
        os.write(out, struct.pack('>I', len(body)) + body)
    send(b'{"type": "ready", "python_version": "3.11.0", "implementation": "CPython", '
         b'"executor": "fake", "banner": "fake", "comms": false}')
    os.read(0, 65536)  # the first request
    depth = int(os.environ["DEPTH"])
    send(b'{"type": "display_data", "data": {"application/json": '
         + b'[' * depth + b']' * depth + b'}, "metadata": {}}')
    time.sleep(30)
""")


def nested(depth: int, leaf: str = "1") -> str:
    """A JSON value nesting arrays and objects alternately `depth` levels deep."""
    text = leaf
    for level in range(depth):
        text = f'{{"k": {text}}}' if level % 2 else f"[{text}]"
    return text


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_bound_is_exact_and_ignores_brackets_in_strings() -> None:
    at_bound = f'{{"type": "comm_msg", "data": {nested(MAX_JSON_DEPTH - 1)}}}'.encode()
    [msg] = FrameDecoder().feed(frame(at_bound))
    assert msg["type"] == "comm_msg"
    over = f'{{"type": "comm_msg", "data": {nested(MAX_JSON_DEPTH)}}}'.encode()
    with pytest.raises(ProtocolError, match=f"nests deeper than {MAX_JSON_DEPTH} levels"):
        FrameDecoder().feed(frame(over))
    # Brackets inside strings, escaped quotes and backslashes included, are text.
    text = json.dumps({"type": "stream", "name": "stdout",
                       "text": '\\"[[[' * 1000 + "{" * 1000 + '"\\'}).encode()
    [msg] = FrameDecoder().feed(frame(text))
    assert msg["text"].startswith('\\"[[[')
    assert not json_depth_exceeds(b'["\\\\", ' + b"[" * 127 + b"]" * 128, MAX_JSON_DEPTH)
    assert json_depth_exceeds(b'["\\\\", ' + b"[" * 128 + b"]" * 129, MAX_JSON_DEPTH)


@pytest.mark.parametrize("depth", [900, 200_000])
def test_guest_sending_deep_json_is_stopped_with_a_clear_reason(depth: int) -> None:
    """900 levels passed Python's JSON decoder and failed in what recursed over the value next;
    200 000 failed in the decoder: both surfaced as RecursionError."""
    events: list = []

    async def main():
        loop = asyncio.get_running_loop()
        session = GuestRepl(LocalBackend(), loop, lambda k, c, b: events.append(k),
                            env={**guest_environment(), "DEPTH": str(depth)}, startup_timeout=10,
                            driver=DRIVER.encode())
        try:
            with pytest.raises(GuestDied) as info:
                await asyncio.wait_for(session.request("execute", code="x"), 20)
            await asyncio.sleep(0.5)
            return info.value.reason, session.restarts
        finally:
            await session.shutdown()

    reason, restarts = asyncio.run(main())
    assert "invalid frame" in reason and f"nests deeper than {MAX_JSON_DEPTH} levels" in reason, reason
    assert "RecursionError" not in reason
    assert restarts == 1
    assert events[-1] == "died"
