"""Servers the network tests start on the host's loopback, and a PEP 503 package index of tiny
wheels built here (no network beyond loopback).

Servers listen on 127.0.0.2, not 127.0.0.1: the guest's NO_PROXY names 127.0.0.1 (the guest's
own servers stay direct), so a guest client asked for 127.0.0.2 goes through the kernel's proxy,
which the test's policy lets through to the host's 127.0.0.2 with an address entry
(`127.0.0.2/32:PORT`; loopback is refused unless an address entry lists it).
"""
from __future__ import annotations

import base64
import hashlib
import html
import re
import shutil
import ssl
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.2"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass


def self_signed(dest: Path, host: str = HOST) -> tuple[Path, Path] | None:
    """A throwaway certificate for `host` made by the `openssl` command (None without it):
    (certificate, key)."""
    if shutil.which("openssl") is None:
        return None
    cert, key = dest / "cert.pem", dest / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@contextmanager
def serve_directory(root: Path, host: str = HOST,
                    tls: tuple[Path, Path] | None = None) -> Iterator[int]:
    """A static HTTP server of `root` on `host` (HTTPS with `tls` = (certificate, key));
    yields its port."""
    server = ThreadingHTTPServer((host, 0), partial(_Quiet, directory=str(root)))
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def normalized(name: str) -> str:
    """A project name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(dest: Path, name: str, version: str, modules: dict[str, str],
                requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel (PEP 427) holding `modules` ({path in the wheel: source})."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = dict(modules)
    files[f"{info}/METADATA"] = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
        + [f"Requires-Dist: {r}\n" for r in requires])
    files[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: supermachine-kernel tests\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def build_index(root: Path, wheels: list[Path]) -> Path:
    """A PEP 503 simple index under `root`/simple/ linking `wheels` (copied to `root`/files/,
    each link with its sha256); returns the index directory."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[Path]] = {}
    for w in wheels:
        target = files / w.name
        target.write_bytes(w.read_bytes())
        projects.setdefault(normalized(w.name.split("-")[0]), []).append(target)
    simple = root / "simple"
    simple.mkdir(exist_ok=True)
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(projects))
    (simple / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    for project, paths in projects.items():
        d = simple / project
        d.mkdir(exist_ok=True)
        anchors = "".join(
            f'<a href="../../files/{html.escape(p.name)}#sha256='
            f'{hashlib.sha256(p.read_bytes()).hexdigest()}">{html.escape(p.name)}</a>\n'
            for p in paths)
        (d / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{anchors}</body></html>\n")
    return simple


def tiny_index(root: Path) -> Path:
    """Two tiny projects: `smk-tiny` 1.0 (module smk_tiny, VALUE = 42) requiring `smk-dep`
    (module smk_dep, NAME = "dep"), so an install also resolves a dependency."""
    built = root / "built"
    built.mkdir(parents=True, exist_ok=True)
    wheels = [
        build_wheel(built, "smk-tiny", "1.0",
                    {"smk_tiny/__init__.py": "from smk_dep import NAME\nVALUE = 42\n"},
                    requires=("smk-dep>=0.1",)),
        build_wheel(built, "smk-dep", "0.1", {"smk_dep/__init__.py": 'NAME = "dep"\n'}),
    ]
    return build_index(root / "index", wheels)
