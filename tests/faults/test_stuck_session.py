"""A stuck guest REPL is reset by the host session in bounded time (repl_client/client.py):
fake drivers on the local backend, so these run without VMs (issue 16 item 1)."""
from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supermachine_kernel.repl_client import GuestRepl, GuestStuck, guest_environment
from supermachine_kernel.repl_client.local import LocalBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from repl_client.test_hostile_guest import PRELUDE  # noqa: E402

# The first incarnation misbehaves; the one started after a reset (a marker file exists) is a
# well-behaved fake that answers every request.
ANSWER_AFTER_RESET = """
    import pathlib
    marker = pathlib.Path(os.environ['MARKER'])
    if marker.exists():
        ready()
        while True:
            req = read_request()
            send({'type': 'reply', 'id': req['id'], 'content': {'status': 'ok', 'payload': [],
                  'user_expressions': {}}})
    marker.write_text('x')
"""


def run(driver_body: str, scenario, tmp_path: Path, timeout: float = 30.0, **options):
    events = []

    async def main():
        loop = asyncio.get_running_loop()
        env = guest_environment({"MARKER": str(tmp_path / "reset")})
        session = GuestRepl(LocalBackend(spares=0), loop,
                            lambda k, c, b: events.append((k, c, b)), env=env,
                            startup_timeout=10,
                            driver=(PRELUDE + textwrap.dedent(ANSWER_AFTER_RESET)
                                    + textwrap.dedent(driver_body)).encode(), **options)
        try:
            return await asyncio.wait_for(scenario(session), timeout)
        finally:
            await session.shutdown()

    return asyncio.run(main()), events


def test_a_frame_header_whose_body_never_comes_resets_the_guest(tmp_path):
    body = """
        ready()
        req = read_request()
        os.write(out, struct.pack('>I', 31 * 1024 * 1024) + b'{"type"')
        time.sleep(600)
    """

    async def scenario(session):
        t0 = time.monotonic()
        with pytest.raises(GuestStuck) as info:
            await session.request("execute", code="x")
        waited = time.monotonic() - t0
        again = await session.request("execute", code="y")
        return info.value, waited, again

    (err, waited, again), _ = run(body, scenario, tmp_path, frame_timeout=1.0)
    assert "began sending a 31.0 MB message" in err.reason
    assert "did not finish it within 1 s" in err.reason
    assert "the Python process was killed" in err.reason
    assert again["status"] == "ok"


def test_frames_that_complete_slowly_are_not_cut(tmp_path):
    """The deadline is per frame: frames that each take a while (0.5 s of a 2 s deadline) but
    complete are fine, however long the stream of them runs (3 s here)."""
    body = """
        ready()
        req = read_request()
        for i in range(6):
            b = json.dumps({'type': 'stream', 'name': 'stdout', 'text': str(i)}).encode()
            os.write(out, struct.pack('>I', len(b)) + b[:5])
            time.sleep(0.5)
            os.write(out, b[5:])
        send({'type': 'reply', 'id': req['id'], 'content': {'status': 'ok', 'payload': [],
              'user_expressions': {}}})
        time.sleep(600)
    """

    async def scenario(session):
        return await session.request("execute", code="x")

    reply, events = run(body, scenario, tmp_path, frame_timeout=2.0)
    assert reply["status"] == "ok"
    assert [c["text"] for k, c, _ in events if k == "stream"] == [str(i) for i in range(6)]


def test_reset_kills_what_the_repl_forked(tmp_path):
    """`reset` kills the REPL's process group: a child it forked goes too."""
    pidfile = tmp_path / "child.pid"
    body = f"""
        ready()
        req = read_request()
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        open({str(pidfile)!r}, 'w').write(str(pid))
        time.sleep(600)
    """

    async def scenario(session):
        request = asyncio.ensure_future(session.request("execute", code="x"))
        while not pidfile.exists() or not pidfile.read_text():
            await asyncio.sleep(0.05)
        message = await session.reset("a test says so")
        with pytest.raises(GuestStuck):
            await request
        again = await session.request("execute", code="y")
        return message, again

    (message, again), _ = run(body, scenario, tmp_path)
    assert message.startswith("a test says so; the Python process was killed"), message
    assert again["status"] == "ok"
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the forked child {pid} still runs")
