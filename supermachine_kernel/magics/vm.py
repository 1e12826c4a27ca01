"""%vm: facts about the microVM this kernel runs in."""
from __future__ import annotations

import asyncio
import time

from ..machine import format_size
from . import ArgumentParser, Context

_parser = ArgumentParser("vm")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _limits() -> list[tuple[str, str]]:
    """The host's limits, how each is held here or why not (supermachine_kernel/limits)."""
    from .. import limits  # noqa: PLC0415 - imports nothing; kernel.py only on limited hosts

    if not limits.active():
        return [("limits", f"none ({limits.limits_file()} does not exist)")]
    from ..limits.kernel import current  # noqa: PLC0415

    return current().report()


async def magic(ctx: Context, args: str) -> None:
    """Show the microVM this kernel runs in: accelerator (kvm, or tcg = software emulation),
    memory, vCPUs, guest image, uptime, memory use, where it came from (the kernel's pool or a
    ``%restore``) and its snapshot lineage (the snapshot the session's state came from, its
    parent, …, back to the kernel's fresh start), and the host's limits on VMs (set by the
    admin in /etc/supermachine-kernel/limits.py): for each, how it is enforced on this host or
    why it is not.
    """
    _parser.parse(args)
    await ctx.machine.ready_handle()  # a kernel's first cell may come while its VM still starts
    facts = await asyncio.to_thread(ctx.machine.facts)
    accel = facts["accelerator"] or "?"
    accel_note = {"tcg": " (software emulation: no hardware virtualization here)",
                  "kvm": " (hardware virtualization)"}.get(accel, "")
    image = facts["image"] or "?"
    if facts.get("image_hash"):
        image += f" ({facts['image_hash']})"
    origin = facts["origin"]
    if facts.get("origin_time"):
        origin += time.strftime(" at %H:%M:%S", time.localtime(facts["origin_time"]))
    lineage = " <- ".join([*facts["lineage"], "fresh start"]) if facts["lineage"] else \
        "fresh start (no snapshot restored or taken in this session)"
    mem = f"{facts['memory_mib']} MiB" if facts["memory_mib"] else "?"
    if facts.get("guest_mem_available_bytes") is not None:
        mem += f" ({format_size(facts['guest_mem_available_bytes'])} available in the guest)"
    rows = [
        ("VM", f"{facts['vm']} (QEMU pid {facts['qemu_pid']})"),
        ("accelerator", accel + accel_note),
        ("memory", mem),
        ("vcpus", str(facts["vcpus"] or "?")),
        ("image", image),
        ("uptime", f"{duration(facts['uptime_s'])} this VM process; "
                   f"{duration(facts['guest_uptime_s'])} guest running time since its cold boot"),
        ("host memory", format_size(facts["host_rss_bytes"]) + " resident (QEMU)"
         if facts.get("host_rss_bytes") else "?"),
        ("came", origin),
        ("lineage", lineage),
        ("notebook", facts["notebook"]),
        ("idle suspend", ctx.kernel.idle.describe() if getattr(ctx.kernel, "idle", None)
         else "off (c.MicroVMKernel.idle_suspend_after = 0)"),
        *_limits(),
    ]
    width = max(len(k) for k, _ in rows)
    ctx.print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
