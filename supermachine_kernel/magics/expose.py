"""%expose: a TCP port of the kernel's VM, reachable on the host's 127.0.0.1 (a link to click).

The exposures belong to the kernel (kept on its HostMagics) and follow the kernel's current
VM: every new connection is relayed to the VM the kernel runs in at that moment, so after
``%restore`` the same host port reaches the restored VM (whose server, if it was running when
the snapshot was taken, runs there too). Connections in flight to the VM that was replaced end
with it. The relay itself is supermachine_kernel/expose.py.
"""
from __future__ import annotations

import html
from typing import Any

from ..expose import MAX_CONNECTIONS, Exposure, Slots
from . import ArgumentParser, Context, MagicError

_parser = ArgumentParser("expose")
_parser.add_argument("port", nargs="?", type=int)
_parser.add_argument("--host-port", type=int, default=0)
_parser.add_argument("--list", action="store_true")
_parser.add_argument("--stop", type=int, metavar="PORT")


class Exposures:
    """One kernel's exposures by guest port, and the connection cap they share."""

    def __init__(self) -> None:
        self.by_port: dict[int, Exposure] = {}
        self.slots = Slots(MAX_CONNECTIONS)


def exposures(ctx: Context) -> Exposures:
    found = getattr(ctx.host, "exposures", None)
    if found is None:
        found = ctx.host.exposures = Exposures()
    return found


def _link(ctx: Context, x: Exposure, lead: str) -> None:
    url = html.escape(x.url)
    ctx.display({
        "text/plain": f"{lead} {x.url}",
        "text/html": f'{html.escape(lead)} <a href="{url}" target="_blank">{url}</a>',
    })


async def magic(ctx: Context, args: str) -> None:
    """Expose a TCP port of this kernel's microVM on the host: a server running in the VM
    (Dash, Streamlit, Bokeh, ``python -m http.server``…) on 127.0.0.1:PORT inside the VM
    becomes http://127.0.0.1:HOSTPORT/ on the machine that runs the kernel.

        %expose 8050                  expose guest port 8050 (on any free host port)
        %expose 8050 --host-port 9000 ... on host port 9000
        %expose --list                the exposed ports and their open connections
        %expose --stop 8050           stop listening (connections in flight go on)

    The host listens on 127.0.0.1 only: the link works in a browser on the kernel's machine
    (or through an SSH tunnel to it). The server in the VM must listen on 127.0.0.1 or 0.0.0.0.
    At most 32 connections at once per kernel. After ``%restore`` the same host port reaches
    the restored VM; a restart of the kernel ends every exposure.
    """
    opts = _parser.parse(args)
    xs = exposures(ctx)
    for port, x in list(xs.by_port.items()):
        if not x.listening:
            del xs.by_port[port]
    if opts.list:
        if not xs.by_port:
            ctx.print("No exposed ports. Expose one with %expose PORT.")
            return
        for port, x in sorted(xs.by_port.items()):
            _link(ctx, x, f"guest port {port} ({x.active} open connections, {x.connections_total} so far) ->")
        return
    if opts.stop is not None:
        if opts.stop not in xs.by_port:
            raise MagicError(f"guest port {opts.stop} is not exposed",
                             "%expose --list shows the exposed ports.", ename="UsageError")
        x = xs.by_port.pop(opts.stop)
        x.stop()
        ctx.print(f"Stopped exposing guest port {opts.stop} (was {x.url}); "
                  f"{x.active} connections in flight go on until they close.")
        return
    if opts.port is None:
        raise MagicError("%expose needs a guest port", "For example: %expose 8050 "
                         "(or %expose --list, %expose --stop 8050)", ename="UsageError")
    machine = ctx.machine
    await machine.ready_handle()
    if opts.port in xs.by_port:
        _link(ctx, xs.by_port[opts.port], f"guest port {opts.port} is already exposed at")
        return

    def vm() -> Any:
        return machine.handle().vm

    try:
        x = Exposure(vm, opts.port, opts.host_port, slots=xs.slots)
    except (ValueError, TypeError, OSError) as e:
        raise MagicError(str(e), "Usage: %expose PORT [--host-port N] (ports 1..65535).",
                         ename="ExposeError") from e
    xs.by_port[opts.port] = x
    _link(ctx, x, f"guest port {opts.port} ->")
