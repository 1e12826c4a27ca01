"""Issue 16 item 2: what a guest repeats at will does not add a host log line each time.

A guest connection to a forwarded port whose host side is closed fails on the host; the
runtime says so on its stderr (the kernel's log). A guest that retries in a loop gets at most
10 such lines a minute (core/runtime/src/log_limit.rs). Against the real agent on a unix
socket, whose "guest" loopback is the host's, so no VM is needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the runtime fixtures
from runtime.conftest import UnixAgent  # noqa: E402
from runtime.helpers import connect_retry, free_port  # noqa: E402

ATTEMPTS = 40


def test_failed_guest_connections_log_a_bounded_number_of_lines(capfd):
    agent = UnixAgent()
    vm = agent.attach()
    gport, dead = free_port(), free_port()
    try:
        vm.forward_to_host(gport, dead)
        for _ in range(ATTEMPTS):
            with connect_retry(gport) as s:  # the host closes it: nothing listens on `dead`
                s.settimeout(30)
                try:
                    assert s.recv(10) == b""
                except ConnectionResetError:
                    pass
    finally:
        vm.release()
        agent.stop()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "connect failed" in line]
    assert 1 <= len(lines) <= 10, err[-2000:]
    print(f"\n{ATTEMPTS} failed guest connections: {len(lines)} log lines")
