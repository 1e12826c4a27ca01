"""The kernel's kernel_info: built here, for the kernel_info_reply and for the launch hint.

The reply advertises no debugger and no subshells (the guest runs one request at a time), and
its language_info carries the guest's Python version, which the image knows before any VM
answers. Built here rather than by ipykernel's base property, which imports ipykernel.debugger
(and debugpy: 60-160 ms before the first reply) only to learn a feature this kernel does not
offer.

The frontend's first kernel_info_request is usually answered before this module is imported,
by the start-up responder (startup/responder.py), from the launch hint that `save_launch_hint`
wrote when an earlier kernel with the same command line had started its guest; the kernel then
publishes no second "starting" status (MicroVMKernel._publish_status).
"""
from __future__ import annotations

import asyncio
import time
import typing as t

from ipykernel.kernelbase import kernel_protocol_version

from ..repl_client import GuestInfo, GuestRepl

HELP_LINKS = [
    {"text": "Python Reference", "url": "https://docs.python.org/3/"},
    {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
]


def build(implementation: str, implementation_version: str, language_info: dict, banner: str,
          help_links: list) -> dict:
    """kernel_info_reply's content, without its status."""
    return {
        "protocol_version": kernel_protocol_version,
        "implementation": implementation,
        "implementation_version": implementation_version,
        "language_info": language_info,
        "banner": banner,
        "help_links": help_links,
        "supported_features": [],
    }


def language_info(python_version: str | None) -> dict:
    return {
        "name": "python",
        "version": python_version or "3",
        "mimetype": "text/x-python",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "pygments_lexer": "ipython3",
        "nbconvert_exporter": "python",
        "file_extension": ".py",
    }


def banner(backend: str, guest: GuestRepl | None, info: GuestInfo | None,
           starting: str = "starting") -> str:
    """The banner for a guest described by `info` (None: not running yet, `starting`)."""
    head = info.banner if info else (guest.info.banner if guest and guest.info
                                     else "Python (microVM)")
    where = info.where if info else f"{backend} backend ({starting})"
    text = f"{head}\nRunning in: {where}"
    if backend == "local":
        text += "\nWARNING: the local backend is NOT isolated: code runs on the host."
    return text


def python_version(guest: GuestRepl | None) -> str | None:
    """The guest's Python version: the running guest's, else what its image says, else None."""
    if guest is None:
        return None
    if guest.info is not None:
        return guest.info.python_version
    version: str | None = getattr(guest.backend, "python_version", None)
    return version


async def wait_for_python_version(guest: GuestRepl | None, timeout: float) -> None:
    """Until the image or the first guest tells the Python version, the start failed, or
    `timeout` seconds passed (the reply is sent anyway; execute then reports why)."""
    deadline = time.monotonic() + timeout
    while guest is not None and python_version(guest) is None and time.monotonic() < deadline:
        starting = guest.starting_future()
        if starting is not None and starting.done() and starting.exception() is not None:
            break
        await asyncio.sleep(0.01)


def save_launch_hint(startup: t.Any, info: dict, guest: GuestRepl, started: t.Any) -> None:
    """Once the first guest runs (`started`: its start future): what the next kernel with this
    command line answers and restores before its imports (startup/hint.py)."""
    if started.cancelled() or started.exception() is not None:
        return
    startup.save_hint(info, getattr(guest.backend, "snapshot_path", None))
