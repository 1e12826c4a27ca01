"""NotebookRunner's sliced shell polling: a lost poll wake-up costs one slice, not the timeout."""
from __future__ import annotations

import asyncio
import time
from queue import Empty

import pytest

from supermachine_kernel.cli.notebook_runner import sliced_get_msg


class LostWakeup:
    """A channel whose poll misses a message that arrives while it is already waiting: the
    message is only seen by a poll that starts after it arrived (or when a poll times out)."""

    def __init__(self, arrives_after: float) -> None:
        self.arrival = time.monotonic() + arrives_after
        self.polls = 0

    async def get_msg(self, timeout: float | None = None) -> dict:
        self.polls += 1
        if time.monotonic() >= self.arrival:
            return {"msg_type": "execute_reply"}
        await asyncio.sleep(timeout if timeout is not None else 3600)
        if time.monotonic() >= self.arrival:
            return {"msg_type": "execute_reply"}
        raise Empty


def test_plain_poll_waits_out_the_timeout():
    chan = LostWakeup(arrives_after=0.05)
    t0 = time.monotonic()
    asyncio.run(chan.get_msg(timeout=1.0))
    assert time.monotonic() - t0 >= 0.95  # the failure mode being guarded against


def test_sliced_poll_sees_the_message_within_a_slice():
    chan = LostWakeup(arrives_after=0.12)
    get = sliced_get_msg(chan.get_msg, slice_s=0.05)
    t0 = time.monotonic()
    msg = asyncio.run(get(timeout=5.0))
    assert msg["msg_type"] == "execute_reply"
    assert time.monotonic() - t0 < 1.0
    assert chan.polls >= 2


def test_sliced_poll_still_times_out():
    chan = LostWakeup(arrives_after=60)
    get = sliced_get_msg(chan.get_msg, slice_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(get(timeout=0.3))
    assert 0.25 <= time.monotonic() - t0 < 2.0


def test_sliced_poll_without_timeout_waits_until_the_message():
    chan = LostWakeup(arrives_after=0.2)
    get = sliced_get_msg(chan.get_msg, slice_s=0.05)
    assert asyncio.run(get(timeout=None))["msg_type"] == "execute_reply"
