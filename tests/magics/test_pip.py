"""%pip install through a real kernel whose policy allows a local package index: the guest's own
pip fetches through the kernel's proxy, installs into the VM's writable layer; %snapshot and
%restore keep the install, a kernel restart starts without it; an index the policy does not
allow is refused and the cell says so.

The index is a PEP 503 simple index of two tiny wheels this test builds (tests/kernel/netserve.py),
served on the host's 127.0.0.2 and allowed by an address entry `127.0.0.2/32:PORT`.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.netserve import HOST, self_signed, serve_directory, tiny_index

from .conftest import BACKEND, MagicKernel, stderr_of, stdout_of

pytestmark = [pytest.mark.vm, pytest.mark.skipif(BACKEND != "vm", reason="%snapshot needs a VM")]


@pytest.fixture(scope="module")
def index_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="smk-pep503-") as d:
        yield tiny_index(Path(d)).parent


@pytest.fixture(scope="module")
def index(index_dir: Path) -> Iterator[int]:
    """The index over plain HTTP (pip asks the proxy with absolute http:// URIs)."""
    with serve_directory(index_dir) as port:
        yield port


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[Path, Path] | None]:
    """A throwaway certificate for the index's address (None without the openssl command)."""
    with tempfile.TemporaryDirectory(prefix="smk-tls-") as d:
        yield self_signed(Path(d))


@pytest.fixture(scope="module")
def tls_index(index_dir: Path, tls: tuple[Path, Path] | None) -> Iterator[int | None]:
    """The same index over HTTPS (pip opens a CONNECT tunnel, as for pypi.org)."""
    if tls is None:
        yield None
        return
    with serve_directory(index_dir, tls=tls) as port:
        yield port


@pytest.fixture(scope="module")
def pip_kernel(data_dir: str, index: int, tls_index: int | None,
               tls: tuple[Path, Path] | None) -> Iterator[MagicKernel]:
    """The index allowed by address, and the guest trusting the index's certificate
    (c.MicroVMKernel.network_ca_certificates, as behind a TLS-inspecting proxy)."""
    allow = [f"--MicroVMKernel.allow_network={HOST}/32:{index}"]
    if tls_index is not None and tls is not None:
        allow.append(f"--MicroVMKernel.allow_network={HOST}/32:{tls_index}")
        allow.append(f"--MicroVMKernel.network_ca_certificates={tls[0]}")
    k = MagicKernel(data_dir, notebook="pip.ipynb", extra_arguments=allow)
    yield k
    k.shutdown()


def pip(k: MagicKernel, line: str) -> tuple[str, str]:
    reply, outputs = k.execute("%pip " + line, timeout=300)
    assert reply["status"] == "ok", (line, reply, outputs)
    return stdout_of(outputs), stderr_of(outputs)


IMPORT = ("try:\n    import smk_tiny\n    print(smk_tiny.VALUE, smk_tiny.NAME, smk_tiny.__file__)\n"
          "except ImportError as e:\n    print('missing', e.name)\n")


def test_pip_install_from_the_allowed_index_survives_snapshot_and_restore(
        pip_kernel: MagicKernel, index: int) -> None:
    out, err = pip(pip_kernel, f"install --index-url http://{HOST}:{index}/simple/ smk-tiny")
    assert "Successfully installed smk-dep-0.1 smk-tiny-1.0" in out, (out, err)
    assert "a kernel restart starts without it" in out
    assert "[network]" not in err
    value, name, where = pip_kernel.ok(IMPORT).split()
    assert (value, name) == ("42", "dep")
    # the guest user's site (c.MicroVMKernel.guest_user), in the VM's writable layer
    assert where.startswith("/home/jovyan/.local/lib/python3"), where

    pip_kernel.ok("%snapshot with-tiny", timeout=300)
    pip(pip_kernel, "uninstall -y smk-tiny smk-dep")
    assert pip_kernel.ok("import sys\nfor m in ('smk_tiny', 'smk_dep'): sys.modules.pop(m, None)\n"
                         + IMPORT).split()[:2] == ["missing", "smk_tiny"]
    pip_kernel.ok("%restore with-tiny", timeout=300)
    assert pip_kernel.ok(IMPORT).split()[:2] == ["42", "dep"]
    # The restored VM is attached to the kernel's proxy again: the index is reachable from it.
    out, err = pip(pip_kernel, f"download --no-deps -d /tmp/dl --index-url "
                               f"http://{HOST}:{index}/simple/ smk-dep")
    assert "Saved /tmp/dl/smk_dep-0.1-py3-none-any.whl" in out, (out, err)


def test_pip_install_over_https_through_a_connect_tunnel(
        pip_kernel: MagicKernel, tls_index: int | None) -> None:
    if tls_index is None:
        pytest.skip("no openssl command to make a certificate")
    # The certificate is verified: the guest trusts network_ca_certificates (no --trusted-host).
    out, err = pip(pip_kernel, f"download --no-deps -d /tmp/tls --index-url "
                               f"https://{HOST}:{tls_index}/simple/ smk-tiny")
    assert "Saved /tmp/tls/smk_tiny-1.0-py3-none-any.whl" in out, (out, err)
    assert "[network]" not in err
    # So does Python's own ssl (urllib's default context).
    page = pip_kernel.ok(f"import urllib.request\nprint(urllib.request.urlopen("
                         f"'https://{HOST}:{tls_index}/simple/', timeout=60).read().decode())")
    assert 'href="smk-tiny/"' in page


def test_an_index_the_policy_does_not_allow_is_refused_and_the_cell_says_so(
        pip_kernel: MagicKernel, index: int) -> None:
    out, err = pip(pip_kernel, f"install --retries 0 --index-url http://127.0.0.3:{index}/simple/ "
                               "smk-other")
    assert "Successfully installed" not in out
    assert (f"[network] network access to 127.0.0.3:{index} is not allowed by this kernel's "
            "policy") in err, err


def test_a_restart_starts_without_what_pip_installed(pip_kernel: MagicKernel, index: int) -> None:
    out, err = pip(pip_kernel, f"install --index-url http://{HOST}:{index}/simple/ smk-tiny")
    assert "smk-tiny" in out, (out, err)
    pip_kernel.km.restart_kernel(now=False)
    pip_kernel.kc.wait_for_ready(timeout=300)
    pip_kernel.flush()
    assert pip_kernel.ok(IMPORT).split()[:2] == ["missing", "smk_tiny"]
