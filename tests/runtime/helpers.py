"""Helpers shared by the runtime tests (and the lab, Hub and security ones): process-table
checks, polling and host ports."""
from __future__ import annotations

import socket
import time
from pathlib import Path


def qemu_pids() -> set:
    """Pids of live (non-zombie) qemu-system processes on this host."""
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        if comm.startswith("qemu-system") and state != "Z":
            pids.add(int(d.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def free_port() -> int:
    """A port free on the host's loopback now (the unix backend's "guest" shares the host's ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_retry(port: int, timeout: float = 30) -> socket.socket:
    """A connection to 127.0.0.1:port, retried while it is refused (the listener is starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
