"""The guest REPL client: one `GuestRepl` per kernel, over an injected backend (VM or local).

client.py `GuestRepl` (requests, events, death, restart, adopting a restored REPL); frames.py
the frame format and its validation; backend.py the backend interface and what backends share;
vm.py and local.py the two backends; attach.py attaching to (and greeting) the REPL a restored
VM already runs.
"""
from typing import Any

from .backend import Backend, guest_environment
from .client import GuestDied, GuestInfo, GuestRepl, GuestStuck, GuestUnavailable
from .frames import ProtocolError

__all__ = [
    "Backend",
    "GuestDied",
    "GuestInfo",
    "GuestRepl",
    "GuestStuck",
    "GuestUnavailable",
    "ProtocolError",
    "guest_environment",
    "make_backend",
]


def make_backend(name: str, **options: Any) -> Backend:
    """`local` (host subprocess, NOT isolated) or `vm` (microVM via supermachine_kernel.api)."""
    # Only the configured backend's module is imported.
    if name == "local":
        from .local import LocalBackend  # noqa: PLC0415

        return LocalBackend(python=options.get("python"), spares=options.get("pool_min", 1),
                            preimport=options.get("warmup_imports"))
    if name == "vm":
        from .vm import VmBackend  # noqa: PLC0415

        return VmBackend(**{k: v for k, v in options.items() if k != "python"})
    raise ValueError(f"unknown backend {name!r}: use 'vm' or 'local'")
