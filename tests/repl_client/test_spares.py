"""Warm spares: a guest started ahead of time is attached with a hello and works like a new one."""
from __future__ import annotations

import asyncio
import time

import psutil

from supermachine_kernel.repl_client import GuestRepl, guest_environment
from supermachine_kernel.repl_client.local import LocalBackend


def test_restart_uses_prestarted_spare():
    async def main():
        loop = asyncio.get_running_loop()
        events = []
        backend = LocalBackend(spares=1, preimport=["json", "decimal"])
        session = GuestRepl(backend, loop, lambda *e: events.append(e),
                               env=guest_environment(), startup_timeout=60)
        try:
            first = await session.wait_ready()
            await session.request("execute", code="x = 1", silent=False, store_history=True,
                                  user_expressions={}, allow_stdin=False, execution_count=1)
            await asyncio.sleep(3)  # let the spare come up
            restart_began = time.time()
            info = await session.restart()
            reply = await session.request(
                "execute", code="import sys; x", silent=False, store_history=True,
                user_expressions={}, allow_stdin=False, execution_count=1)
            pid = await session.request(
                "execute", code="", silent=True, store_history=False,
                user_expressions={"pid": "__import__('os').getpid()"}, allow_stdin=False,
                execution_count=1)
            guest_pid = int(pid["user_expressions"]["pid"]["data"]["text/plain"])
            return first, info, restart_began, reply, psutil.Process(guest_pid).create_time()
        finally:
            await session.shutdown()

    first, info, restart_began, reply, guest_started = asyncio.run(main())
    assert info.python_version == first.python_version
    assert reply["status"] == "error" and reply["ename"] == "NameError"  # fresh namespace
    assert reply["user_expressions"] == {}
    # The REPL that answers after the restart is the spare, started before the restart began.
    assert guest_started < restart_began


def test_spare_preimports_modules():
    async def main():
        loop = asyncio.get_running_loop()
        backend = LocalBackend(spares=1, preimport=["decimal"])
        session = GuestRepl(backend, loop, lambda *e: None, env=guest_environment(),
                               startup_timeout=60)
        try:
            await session.wait_ready()
            await asyncio.sleep(3)
            await session.restart()
            return await session.request(
                "execute", code="1", silent=False, store_history=True,
                user_expressions={"m": "'decimal' in __import__('sys').modules"},
                allow_stdin=False, execution_count=1)
        finally:
            await session.shutdown()

    reply = asyncio.run(main())
    assert reply["user_expressions"]["m"]["data"]["text/plain"] == "True"
