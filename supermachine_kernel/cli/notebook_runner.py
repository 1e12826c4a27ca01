"""Headless notebook execution (nbclient) that cannot miss an execute_reply.

nbclient waits for a cell's execute_reply by polling the shell socket (pyzmq asyncio) while,
from another task, its ipywidgets `Output` mimic sends comm messages on that same socket
whenever a cell prints or clears into an Output widget. jupyter_client's `Session.send` writes
through a blocking shadow of the asyncio socket, which takes the socket's wake-up for an
incoming message without pyzmq's asyncio layer noticing: if the reply has just arrived, the poll
sleeps until the cell's whole timeout and only then finds it (jupyter/nbclient#312). This is
the client's race, with any kernel. Measured with nbclient 0.11, jupyter_client 8.10, pyzmq 27.3:
plain ipykernel missed the reply in 4 of 100 runs of the demo notebook's `slider.value = 7`
cell and in 13 of 100 cells printing 20 lines into an Output widget; this kernel in 8 of 60 and
18 of 100 (a guest's output and its reply reach the client closer together). `NotebookRunner` polls the shell channel in short slices, so a lost
wake-up costs at most one slice. Used by `make demo` and the notebook tests.
"""
from __future__ import annotations

import time
import typing as t
from queue import Empty

from nbclient import NotebookClient

POLL_SLICE_S = 0.1


def sliced_get_msg(get_msg: t.Callable[..., t.Awaitable[dict]],
                   slice_s: float = POLL_SLICE_S) -> t.Callable[..., t.Awaitable[dict]]:
    """Wrap an async ``get_msg(timeout=...)`` so it re-polls every ``slice_s`` seconds."""

    async def get_msg_in_slices(timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_s if deadline is None else min(slice_s, max(0.0, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return get_msg_in_slices


class NotebookRunner(NotebookClient):
    """An nbclient NotebookClient whose shell channel polls in short slices (see module doc)."""

    async def async_start_new_kernel_client(self) -> t.Any:
        kc = await super().async_start_new_kernel_client()
        kc.shell_channel.get_msg = sliced_get_msg(kc.shell_channel.get_msg)
        return kc
