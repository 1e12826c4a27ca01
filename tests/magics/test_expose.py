"""%expose through a real kernel: a web server started by a cell in the guest is fetched from
the host through the printed link; --list, --stop; the link survives %restore."""
from __future__ import annotations

import http.client
import re
import socket
import time
import urllib.request

import pytest

SERVE = """
import os, subprocess, sys, tempfile
d = tempfile.mkdtemp()
open(os.path.join(d, "page.txt"), "w").write({text!r})
server = subprocess.Popen([sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1",
                           "--directory", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""


def displayed(kernel, code: str) -> dict:
    reply, outputs = kernel.execute(code, timeout=120)
    assert reply["status"] == "ok", (code, reply, outputs)
    data = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
    assert len(data) == 1, outputs
    return data[0]


def fetch(url: str, deadline: float = 120) -> bytes:
    end = time.monotonic() + deadline
    while True:
        try:
            return urllib.request.urlopen(url, timeout=60).read()
        except (OSError, http.client.HTTPException):
            if time.monotonic() > end:
                raise
            time.sleep(0.5)  # the guest server may still be starting


def test_expose_prints_a_link_that_reaches_the_guest_server(kernel):
    kernel.ok(SERVE.format(text="served from the VM", port=8050))
    data = displayed(kernel, "%expose 8050")
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", data["text/plain"])
    assert m, data
    url = m.group(0)
    assert f'href="{url}"' in data["text/html"]
    assert fetch(url + "page.txt") == b"served from the VM"

    again = displayed(kernel, "%expose 8050")
    assert "already exposed" in again["text/plain"] and url in again["text/plain"]
    listed = displayed(kernel, "%expose --list")
    assert "guest port 8050" in listed["text/plain"] and url in listed["text/plain"]

    # After %restore the same host port reaches the restored VM, whose server runs there too.
    kernel.ok("%snapshot served", timeout=300)
    kernel.ok("open(os.path.join(d, 'page.txt'), 'w').write('changed after the snapshot')")
    assert fetch(url + "page.txt") == b"changed after the snapshot"
    kernel.ok("%restore served", timeout=300)
    assert fetch(url + "page.txt") == b"served from the VM"

    out = kernel.ok("%expose --stop 8050")
    assert "Stopped exposing guest port 8050" in out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10).close()
    assert "No exposed ports" in kernel.ok("%expose --list")


def test_expose_usage_errors(kernel):
    _, errors = kernel.error("%expose")
    assert errors[0]["ename"] == "UsageError" and "needs a guest port" in errors[0]["evalue"]
    _, errors = kernel.error("%expose --stop 9999")
    assert "not exposed" in errors[0]["evalue"]
    _, errors = kernel.error("%expose 70000")
    assert errors[0]["ename"] == "ExposeError" and "1..65535" in errors[0]["evalue"]
