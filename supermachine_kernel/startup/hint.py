"""Launch hints: what the last kernel started with the same command line learned, kept for the
next kernel process's first milliseconds (sequence.py): its kernel_info reply and the warm
snapshot its VM came from.

A hint is a guess, never trusted for anything that matters: the kernel's VM backend adopts a VM
restored from the hinted snapshot only if its own configuration resolves to that very snapshot,
and every kernel rewrites the hint once it is running. The key covers the kernel's arguments
(without the connection file), the Python running it, this package's version and the
environment variables that change the kernel's configuration; a change elsewhere (a Jupyter
config file) costs at most one wasted restore and one kernel_info with the previous values.

Imports nothing heavy: it runs before ipykernel is loaded.
"""
from __future__ import annotations

import hashlib
import os
import sys

from .listeners import CONNECTION_FILE_FLAGS, CONNECTION_FILE_PREFIXES, parse_json

# `json` and `typing` are imported only where needed: reading a hint is on the path of the
# kernel process's first milliseconds (sequence.py). mypy reads TYPE_CHECKING as typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

FORMAT = 1
_ENV_PREFIXES = ("SUPERMACHINE_", "JUPYTER_CONFIG", "JUPYTER_PATH", "XDG_CACHE_HOME", "XDG_CONFIG")


def kernel_args(argv: list[str]) -> list[str]:
    """`argv` without the connection file (listeners.connection_file_arg's forms), which
    differs for every kernel."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in CONNECTION_FILE_FLAGS:
            skip = True
        elif not arg.startswith(CONNECTION_FILE_PREFIXES):
            out.append(arg)
    return out


def hint_key(argv: list[str], env: dict[str, str], version: str) -> str:
    relevant = sorted((k, v) for k, v in env.items()
                      if k.startswith(_ENV_PREFIXES) and k != "SUPERMACHINE_EARLY_START")
    material = repr([FORMAT, version, sys.executable, kernel_args(argv), relevant])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def hints_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, "launch-hints")


def read(cache_dir: str, key: str) -> Optional[dict[str, Any]]:
    """The hint for `key`, or None (missing, unreadable, or not a hint of this format)."""
    try:
        with open(os.path.join(hints_dir(cache_dir), key + ".json")) as f:
            hint = parse_json(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(hint, dict) or hint.get("format") != FORMAT:
        return None
    info = hint.get("kernel_info")
    if not isinstance(info, dict) or not isinstance(info.get("protocol_version"), str):
        return None
    snapshot = hint.get("snapshot")
    if snapshot is not None and not isinstance(snapshot, str):
        return None
    return hint


def write(cache_dir: str, key: str, kernel_info: dict[str, Any], snapshot: Optional[str]) -> None:
    """Writes the hint atomically (a concurrent reader sees the old one or the new one)."""
    import json  # noqa: PLC0415 - only the running kernel writes hints
    import tempfile  # noqa: PLC0415

    directory = hints_dir(cache_dir)
    os.makedirs(directory, exist_ok=True)
    data = json.dumps({"format": FORMAT, "kernel_info": kernel_info, "snapshot": snapshot})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hint-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, key + ".json"))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
