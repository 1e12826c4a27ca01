"""A kernel's egress proxy listens on the host's shared 127.0.0.1 (runtime net/proxy.rs); it
serves only connections its own user opened, so another local user cannot borrow a kernel's
network policy through its port (runtime net/peer.rs)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from supermachine_kernel import _core

# Another user connects, sends a CONNECT the policy would answer, and prints what came back.
_OTHER_USER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\\r\\nHost: allowed.test:443\\r\\n\\r\\n")
data = b""
try:
    while chunk := s.recv(4096):
        data += chunk
except (ConnectionResetError, socket.timeout):
    pass
print(repr(data))
"""


def _system_python() -> str:
    """A Python the other user can run (the test venv's may live under /root, 0700)."""
    found = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        pytest.skip("no system python3 for the other user")
    return found


def _answer_to_own_user(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n")
        return s.recv(4096)


def test_another_local_user_gets_nothing_from_a_kernels_proxy() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    proxy = _core.NetProxy(["allowed.test"], resolve={"allowed.test": ["198.51.100.7"],  # type: ignore[arg-type]
                                                        "other.test": ["198.51.100.7"]})
    try:
        # Its own user is served (a policy refusal is an answer).
        assert _answer_to_own_user(proxy.port).startswith(b"HTTP/1.1 403"), "own user not served"
        out = subprocess.run([_system_python(), "-c", _OTHER_USER, str(proxy.port)],
                             preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),  # type: ignore[func-returns-value]
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "b''", out.stdout
        assert proxy.active_connections == 0
    finally:
        proxy.close()
