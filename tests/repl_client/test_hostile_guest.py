"""A hostile or broken guest cannot crash the host session: fake drivers on the local backend."""
from __future__ import annotations

import asyncio
import logging
import textwrap

import pytest

from supermachine_kernel.repl_client import GuestDied, GuestRepl, GuestUnavailable, guest_environment
from supermachine_kernel.repl_client.local import LocalBackend

PRELUDE = textwrap.dedent("""
    import json, os, struct, sys, time
    out = os.dup(1)
    def send(obj):
        b = json.dumps(obj).encode()
        os.write(out, struct.pack('>I', len(b)) + b)
    def ready():
        send({'type': 'ready', 'python_version': '3.11.0', 'implementation': 'CPython',
              'executor': 'fake', 'banner': 'fake', 'comms': False})
    def read_request():
        head = os.read(0, 4)
        (n,) = struct.unpack('>I', head)
        body = b''
        while len(body) < n:
            body += os.read(0, n - len(body))
        return json.loads(body)
""")


def run_session(driver_body: str, scenario, timeout: float = 20.0):
    events = []

    async def main():
        loop = asyncio.get_running_loop()
        session = GuestRepl(LocalBackend(), loop, lambda k, c, b: events.append((k, c, b)),
                               env=guest_environment(), startup_timeout=10,
                               driver=(PRELUDE + textwrap.dedent(driver_body)).encode())
        try:
            return await asyncio.wait_for(scenario(session), timeout)
        finally:
            await session.shutdown()

    return asyncio.run(main()), events


def test_invalid_messages_are_dropped_not_fatal():
    body = """
        ready()
        req = read_request()
        send({'type': 'display_data', 'data': {'text/plain': 12345}})
        send({'type': 'stream', 'name': 'evil', 'text': 'x'})
        send({'type': 'stream', 'name': 'stdout', 'text': 'fine'})
        send({'type': 'reply', 'id': req['id'], 'content': {'status': 'ok', 'payload': [],
              'user_expressions': {}}})
        time.sleep(30)
    """

    async def scenario(session):
        return await session.request("execute", code="x")

    reply, events = run_session(body, scenario)
    assert reply["status"] == "ok"
    kinds = [k for k, _, _ in events]
    assert kinds == ["invalid", "invalid", "stream"]
    assert "must be a string" in events[0][1]["error"]


def test_bad_reply_content_fails_only_that_request():
    body = """
        ready()
        req = read_request()
        send({'type': 'reply', 'id': req['id'], 'content': {'status': 'ok', 'matches': 'nope'}})
        req = read_request()
        send({'type': 'reply', 'id': req['id'], 'content': {'status': 'complete'}})
        time.sleep(30)
    """

    async def scenario(session):
        from supermachine_kernel.repl_client import ProtocolError

        with pytest.raises(ProtocolError):
            await session.request("complete", code="x", cursor_pos=1)
        return await session.request("is_complete", code="x")

    reply, _ = run_session(body, scenario)
    assert reply == {"status": "complete"}


@pytest.mark.parametrize("garbage", [
    "os.write(out, struct.pack('>I', 1 << 30))",
    "os.write(out, struct.pack('>I', 5) + b'nope!')",
])
def test_framing_garbage_kills_that_guest_and_restarts(garbage):
    body = f"""
        ready()
        req = read_request()
        {garbage}
        time.sleep(30)
    """

    async def scenario(session):
        with pytest.raises(GuestDied) as info:
            await session.request("execute", code="x")
        await asyncio.sleep(0.5)
        return info.value.reason, session.restarts

    (reason, restarts), events = run_session(body, scenario)
    assert "invalid frame" in reason
    assert restarts == 1
    assert events[-1][0] == "died"


def test_output_before_bad_framing_in_the_same_write_is_delivered():
    # One write: the cell's output, then a frame whose body is not JSON. The output reaches the
    # frontend before the session reports the invalid frame (nothing the guest sent well is lost).
    body = """
        ready()
        req = read_request()
        good = b''.join(struct.pack('>I', len(b)) + b for b in (
            json.dumps({'type': 'stream', 'name': 'stdout', 'text': f'line {i}\\n'}).encode()
            for i in range(3)))
        os.write(out, good + struct.pack('>I', 5) + b'nope!')
        time.sleep(30)
    """

    async def scenario(session):
        with pytest.raises(GuestDied) as info:
            await session.request("execute", code="x")
        await asyncio.sleep(0.5)
        return info.value.reason

    reason, events = run_session(body, scenario)
    assert "invalid frame" in reason
    # Up to the death (the restarted fake guest may print again afterwards).
    before = events[:[k for k, _, _ in events].index("died")]
    assert [(k, c["text"]) for k, c, _ in before] == [("stream", f"line {i}\n") for i in range(3)], events


def test_stderr_flood_puts_a_few_short_lines_into_the_debug_log(caplog):
    # The REPL's own stderr goes to the kernel log only with debug logging on: 200 writes of
    # 20 kB give at most 10 lines a minute, each quoted to 1000 characters.
    body = """
        ready()
        req = read_request()
        for i in range(200):
            os.write(2, b'x' * 20000 + b'\\n')
            time.sleep(0.002)
        send({'type': 'reply', 'id': req['id'], 'content': {'status': 'complete'}})
        time.sleep(30)
    """

    async def scenario(session):
        reply = await session.request("is_complete", code="x")
        await asyncio.sleep(0.5)
        return reply

    with caplog.at_level(logging.DEBUG, logger="supermachine_kernel.repl_client"):
        reply, _ = run_session(body, scenario)
    assert reply == {"status": "complete"}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("guest stderr:")]
    assert 1 <= len(lines) <= 10, len(lines)
    assert all(len(line) < 1200 for line in lines), max(map(len, lines))


def test_guest_that_exits_at_start_is_reported():
    async def scenario(session):
        with pytest.raises(GuestUnavailable) as info:
            await session.wait_ready()
        return str(info.value)

    message, _ = run_session("sys.stderr.write('no python here\\n'); sys.exit(3)\n", scenario)
    assert "exited with code 3" in message
    assert "no python here" in message


def test_guest_that_never_answers_times_out():
    async def scenario(session):
        session.startup_timeout = 1
        with pytest.raises(GuestUnavailable) as info:
            await session.wait_ready()
        return str(info.value)

    message, _ = run_session("time.sleep(60)\n", scenario)
    assert "did not start within" in message


def test_flood_is_flow_controlled():
    """A guest writing as fast as it can blocks on the pipe; host memory stays bounded."""
    body = """
        ready()
        req = read_request()
        chunk = 'f' * 60000
        for i in range(2000):
            send({'type': 'stream', 'name': 'stdout', 'text': chunk})
        send({'type': 'reply', 'id': req['id'], 'content': {'status': 'ok'}})
        time.sleep(30)
    """

    async def scenario(session):
        return await session.request("execute", code="x")

    reply, events = run_session(body, scenario, timeout=60)
    assert reply["status"] == "ok"
    assert len(events) == 2000
