"""The guest REPL's output path without a VM: stream text leaves as raw frames that the host's
FrameDecoder turns back into the same stream messages, whole (every character, multi-byte ones
and lone surrogates included) and in order with JSON frames; a writer that falls behind blocks
its senders instead of queueing without bound (guest/repl.py Channel and StreamBuffer,
session/protocol.py FrameDecoder)."""
from __future__ import annotations

import os
import struct
import threading
import time

from supermachine_kernel.repl_client.frames import FrameDecoder


class Host:
    """A REPL Channel writing into a pipe, and the host side decoding what comes out."""

    def __init__(self, repl, read: bool = True) -> None:
        r, self._w = os.pipe()
        self._r = r
        self.channel = repl.Channel(os.open(os.devnull, os.O_RDONLY), self._w)
        self.msgs: list[dict] = []
        self._decoder = FrameDecoder()
        self._reading = threading.Thread(target=self._read_loop, daemon=True)
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        self._reading.start()

    def _read_loop(self) -> None:
        while True:
            data = os.read(self._r, 1 << 20)
            if not data:
                return
            self.msgs += self._decoder.feed(data)

    def finish(self) -> list[dict]:
        """Sends a last frame, waits until it arrived (so has everything before it), closes."""
        self.channel.send({"type": "reply", "id": -1, "content": {}})
        deadline = time.monotonic() + 60
        while not (self.msgs and self.msgs[-1].get("id") == -1):
            assert time.monotonic() < deadline, "the REPL's writer stopped writing"
            time.sleep(0.01)
        os.close(self._w)
        self._reading.join(timeout=10)
        os.close(self._r)
        return self.msgs[:-1]


def coalesced(msgs: list[dict]) -> list[tuple[str, str]]:
    """(stream name or message type, text) with consecutive same-stream messages joined."""
    out: list[tuple[str, str]] = []
    for m in msgs:
        kind, text = (m["name"], m["text"]) if m["type"] == "stream" else (m["type"], str(m.get("data")))
        if out and m["type"] == "stream" and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def test_stream_text_arrives_whole_and_in_order_with_json_frames(repl):
    host = Host(repl)
    out = repl.StreamBuffer(host.channel, "stdout")
    err = repl.StreamBuffer(host.channel, "stderr")
    expected: list[tuple[str, str]] = []
    segment: list[str] = []
    for i in range(30_000):
        # ASCII and 2-, 3- and 4-byte characters, lines up to ~1.5 KB: many raw frames, some
        # split by the STREAM_CHUNK limit
        line = f"{i:06d} {'é€😀' * (i % 7)}{'x' * (i % 1500)}\n"
        out.write(line)
        segment.append(line)
        if i % 7_000 == 6_999:
            out.flush()
            expected.append(("stdout", "".join(segment)))
            segment = []
            host.channel.send({"type": "display_data", "data": {"text/plain": str(i)}})
            expected.append(("display_data", str({"text/plain": str(i)})))
            err.write(f"err {i}\n")
            err.flush()
            expected.append(("stderr", f"err {i}\n"))
    out.write("A\ud800B \udcff\n")  # lone surrogates (a surrogateescape'd file name, say)
    segment.append("A\ufffdB \ufffd\n")
    out.flush()
    expected.append(("stdout", "".join(segment)))
    msgs = host.finish()
    assert coalesced(msgs) == expected
    assert all(len(m["text"]) <= repl.STREAM_CHUNK for m in msgs if m["type"] == "stream")


def test_a_writer_that_falls_behind_blocks_its_senders(repl):
    host = Host(repl, read=False)  # nobody reads the pipe yet
    frames = 40
    sent = []

    def sender():
        for i in range(frames):
            host.channel.send_stream("stdout", (b"%02d" % i) * (1 << 19))  # 1 MiB each
            sent.append(i)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    last, deadline = -1, time.monotonic() + 60
    while len(sent) != last:  # until the sender makes no more progress
        assert time.monotonic() < deadline
        last = len(sent)
        time.sleep(0.5)
    # At most what the queue holds, plus the batch being written and the pipe's contents.
    bound = (repl.MAX_QUEUED + repl.STREAM_CHUNK + repl.PIPE_SIZE) // (1 << 20) + 2
    assert len(sent) <= bound < frames
    host.start_reading()
    thread.join(timeout=60)
    assert sent == list(range(frames))
    msgs = host.finish()
    assert [m["text"][:2] for m in msgs] == ["%02d" % i for i in range(frames)]
    assert all(len(m["text"]) == 1 << 20 for m in msgs)


def test_json_frames_keep_working_beside_raw_ones(repl):
    host = Host(repl)
    host.channel.send({"type": "execute_result", "data": {"text/plain": "1"}}, hold=True)
    host.channel.send_stream("stderr", "ünïcode\n".encode())
    host.channel.send({"type": "error", "ename": "E", "evalue": "v", "traceback": []})
    msgs = host.finish()
    assert [m["type"] for m in msgs] == ["execute_result", "stream", "error"]
    assert msgs[1] == {"type": "stream", "name": "stderr", "text": "ünïcode\n"}
    head = struct.pack(">I", repl.RAW_STREAM | 3) + b"\x01hi"
    assert FrameDecoder().feed(head) == [{"type": "stream", "name": "stdout", "text": "hi"}]
