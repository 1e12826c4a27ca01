"""The kernel process's first act: listen on its shell and iopub ports, ~25 ms after it started.

A frontend whose kernel restarts reconnects 100-200 ms (ZMQ's `reconnect_ivl` plus jitter) after
the old process closed its sockets, and it starts the new process only ~110 ms after asking the
old one to stop (jupyter_client polls every 100 ms). A connection attempt that finds the port
closed waits another 100-200 ms, so every millisecond before the port accepts counts.
`EarlyListeners.listen(argv)` opens plain TCP listening sockets on the two ports named by the
connection file; the operating system accepts the frontend's connections from then on and
`sockets.EarlySockets.bind` hands the sockets to ZMQ (`ZMQ_USE_FD`), which completes the
ZMTP handshakes. Only IPv4 addresses are handled (ZMQ binds IPv6 only when asked to); anything
else returns None and ZMQ or ipykernel binds the ports as usual.

Imports only modules built into the interpreter: `json`, `socket` and `typing` would take about
as long again as the interpreter's own start (json's C scanner is used directly, and the full
`json` module only when that is not available).
"""
from __future__ import annotations

import _socket
import os

# How a kernelspec passes the connection file: `-f PATH`, `--f PATH`, `-f=PATH`, `--f=PATH`.
CONNECTION_FILE_FLAGS = ("-f", "--f")
CONNECTION_FILE_PREFIXES = ("-f=", "--f=")


def connection_file_arg(argv: list[str]) -> str | None:
    """The connection file given in `argv` (see CONNECTION_FILE_FLAGS / _PREFIXES)."""
    for i, arg in enumerate(argv):
        if arg in CONNECTION_FILE_FLAGS and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in CONNECTION_FILE_PREFIXES:
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None


class _ScannerContext:
    """What json's C scanner reads from its decoder: plain JSON, nothing customised."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None


def parse_json(text: str) -> object:
    """`json.loads(text)` for a document that is one JSON value, without importing `json`."""
    try:
        from _json import make_scanner  # noqa: PLC0415

        scan = make_scanner(_ScannerContext())  # type: ignore[arg-type]
        start = len(text) - len(text.lstrip())
        value, end = scan(text, start)
        if text[end:].strip():
            raise ValueError("extra data after the JSON value")
        return value
    except (ImportError, AttributeError, TypeError):  # an interpreter without the C scanner
        import json  # noqa: PLC0415

        return json.loads(text)
    except StopIteration as e:
        raise ValueError(f"not JSON at character {e.value}") from None


def plain_tcp_info(path: str | None) -> dict | None:
    """The connection file's contents if it names plain TCP ports to bind early, else None."""
    if not path:
        return None
    try:
        with open(path) as f:
            info = parse_json(f.read())
        if not isinstance(info, dict):
            return None
        if info.get("transport", "tcp") != "tcp":
            return None
        # CurveZMQ keys (z85 text), if any, must come as a pair of strings.
        curve = info.get("curve_secretkey"), info.get("curve_publickey")
        if any(curve) and not all(isinstance(k, str) and k for k in curve):
            return None
        if int(info["shell_port"]) <= 0 or int(info["iopub_port"]) <= 0 or not info["ip"]:
            return None
    except Exception:  # noqa: BLE001 - ipykernel reads it again and reports problems
        return None
    return info


class EarlyListeners:
    """Listening TCP sockets (file descriptors) on the shell and iopub ports, for ZMQ to adopt."""

    def __init__(self, info: dict, fds: dict[int, int]) -> None:
        self.info = info  # the connection file, as plain_tcp_info read it
        self.ip: str = info["ip"]
        self._fds = fds

    @classmethod
    def listen(cls, argv: list[str]) -> "EarlyListeners | None":
        info = plain_tcp_info(connection_file_arg(argv))
        if info is None:
            return None
        ip = info["ip"]
        try:
            _socket.inet_pton(_socket.AF_INET, ip)
        except (OSError, TypeError, ValueError):
            return None
        listeners = cls(info, {})
        try:
            for port in (int(info["shell_port"]), int(info["iopub_port"])):
                sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
                try:
                    # As ZMQ's own listener does: a restarted kernel binds its predecessor's
                    # ports while their closed connections are still in TIME_WAIT.
                    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                    sock.bind((ip, port))
                    sock.listen(100)
                except OSError:
                    sock.close()
                    raise
                listeners._fds[port] = sock.detach()
        except OSError:  # e.g. the port is taken: ZMQ's bind fails too and ipykernel says so
            listeners.close()
            return None
        return listeners

    def take(self, ip: str, port: int) -> int | None:
        """The listening socket's file descriptor for `ip:port`; the caller owns it from now on."""
        return self._fds.pop(port, None) if ip == self.ip else None

    def close(self) -> None:
        """Closes the listening sockets nobody took."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
