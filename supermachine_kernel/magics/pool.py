"""%pool: a live widget with the kernel's VM pool stats, updated from the host.

The widget sends an update only when what it shows changed: it shows the VM's start time, not a
ticking uptime, and no "updated at" clock. An idle kernel with %pool on screen then sends
nothing, so the frontend's and JupyterHub's idle culling see it as idle (a per-second update
was kernel activity forever)."""
from __future__ import annotations

import html
import time
from typing import Iterable

from ..machine import Machine, process_start_time, process_uptime
from . import ArgumentParser, Context

_parser = ArgumentParser("pool")
_parser.add_argument("--text", action="store_true")
COUNTERS = ("alive", "in_use", "idle", "waiting", "min", "max")


def _ms(values: Iterable[float] | None) -> str:
    values = list(values or [])[-5:]
    return ", ".join(f"{v:.0f}" for v in values) + " ms" if values else "-"


def pool_stats(machine: Machine) -> dict:
    """Everything the widget shows, as plain values (also what ``%pool --text`` prints)."""
    pool = machine.pool()
    stats = dict(pool.stats()) if pool is not None else {}
    out = {k: stats.get(k) for k in COUNTERS}
    out["creating"] = stats.get("creating")
    out["recent_acquire_ms"] = list(stats.get("recent_acquire_ms") or [])
    out["recent_create_ms"] = list(stats.get("recent_create_ms") or [])
    out["recent_restore_ms"] = list(machine.restore_ms)
    out["recent_snapshot_ms"] = list(machine.snapshot_ms)
    out["has_pool"] = pool is not None
    try:
        handle = machine.handle()
        vm = handle.vm
        out["accelerator"] = getattr(vm, "accel", None)
        out["vm"] = getattr(vm, "id", None)
        out["vm_uptime_s"] = process_uptime(getattr(vm, "qemu_pid", None))
        out["vm_started"] = _started_at(getattr(vm, "qemu_pid", None))
    except Exception:  # noqa: BLE001 - no VM right now
        out["accelerator"] = out["vm"] = out["vm_uptime_s"] = out["vm_started"] = None
    return out


def _started_at(pid: int | None) -> str | None:
    """Local wall-clock time host process ``pid`` started, "HH:MM:SS", or None."""
    started = process_start_time(pid)
    return None if started is None else time.strftime("%H:%M:%S", time.localtime(started))


def render_text(s: dict) -> str:
    if not s["has_pool"]:
        head = "no VM pool (this kernel boots its VMs without one)"
    else:
        head = "  ".join(f"{k}={s[k]}" for k in COUNTERS)
    up = f"{s['vm_uptime_s']:.0f} s" if s["vm_uptime_s"] is not None else "-"
    return "\n".join([
        f"pool: {head}",
        f"accelerator: {s['accelerator'] or '?'}   current VM: {s['vm'] or '-'} (up {up})",
        f"recent pool acquires: {_ms(s['recent_acquire_ms'])}",
        f"recent pool restores: {_ms(s['recent_create_ms'])}",
        f"recent %restore: {_ms(s['recent_restore_ms'])}   %snapshot: {_ms(s['recent_snapshot_ms'])}",
    ])


def render_html(s: dict) -> str:
    if s["has_pool"]:
        cells = "".join(
            f'<td style="padding:0 8px;text-align:center"><div style="font-size:1.4em">'
            f"{s[k]}</div><div style=\"opacity:.7\">{k}</div></td>" for k in COUNTERS)
        counters = f"<table><tr>{cells}</tr></table>"
    else:
        counters = "<p>No VM pool: this kernel boots its VMs without one.</p>"
    started = f" (started {s['vm_started']})" if s["vm_started"] else ""
    rows = [
        ("accelerator", s["accelerator"] or "?"),
        ("current VM", f"{s['vm'] or '-'}{started}"),
        ("recent pool acquires", _ms(s["recent_acquire_ms"])),
        ("recent pool restores", _ms(s["recent_create_ms"])),
        ("recent %restore", _ms(s["recent_restore_ms"])),
        ("recent %snapshot", _ms(s["recent_snapshot_ms"])),
    ]
    table = "".join(f"<tr><td style=\"padding-right:12px;opacity:.7\">{html.escape(k)}</td>"
                    f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
    return (f'<div class="supermachine-pool"><b>microVM pool</b>{counters}'
            f"<table>{table}</table></div>")


async def magic(ctx: Context, args: str) -> None:
    """Show the kernel's VM pool as a live widget: VMs alive, in use, idle, callers waiting,
    the pool's min and max, the accelerator in use, and the latencies of recent pool acquires,
    pool restores and ``%restore``/``%snapshot`` runs. The kernel process checks the figures
    every second, while cells run too, and updates the widget when one changed.

        %pool          the live widget
        %pool --text   the same figures once, as text
    """
    opts = _parser.parse(args)
    machine = ctx.machine
    await machine.ready_handle()  # as a kernel's first cell: its backend makes the pool on start
    stats = pool_stats(machine)
    if opts.text or ctx.silent:
        ctx.print(render_text(stats))
        return
    widgets = ctx.widgets
    widgets.parent = ctx.parent
    w = widgets.html(render_html(stats), text=render_text(stats))
    w.display(parent=ctx.parent)

    def render() -> dict:
        s = pool_stats(machine)
        return {"value": render_html(s)}

    widgets.start_ticker(w, render, interval=1.0)
