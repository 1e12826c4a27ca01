"""Headless notebook execution (nbclient) that cannot miss an execute_reply.

nbclient waits for a cell's execute_reply by polling the shell socket while, from another
task, it sends comm messages on that same socket (it does so when an ipywidgets Output widget
captures output). With pyzmq's asyncio sockets that send can swallow the poll's wake-up, and
the reply, although already received, is only noticed when the cell's whole timeout expires
(jupyter/nbclient#312; any kernel, ours hits it because a guest cell takes a few ms longer).
`NotebookRunner` polls the shell channel in short slices, so a lost wake-up costs at most one
slice. Used by `make demo` and the notebook tests.
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
