"""kernel/network.py without a kernel: the guest's proxy environment, what attaching a guest does
(the forward on its VM, the environment frame, a VM that cannot forward), the cell's report of
refused connections (a real NetProxy refusing real connections), and the caps' traits."""
from __future__ import annotations

import socket
from typing import Any

import pytest
from traitlets import TraitError
from traitlets.config import Config

from supermachine_kernel.kernel import network
from supermachine_kernel.kernel.config import GuestConfig


class FakeVm:
    def __init__(self, fail: Exception | None = None) -> None:
        self.forwards: list[tuple[int, int]] = []
        self.fail = fail
        self.id = "vm-test"

    def forward_to_host(self, guest_port: int, host_port: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.forwards.append((guest_port, host_port))


class Handle:
    def __init__(self, vm: Any = None) -> None:
        if vm is not None:
            self.vm = vm


@pytest.fixture
def hook() -> Any:
    h = network.NetworkHook(["allowed.test:443"], max_connections=4, bandwidth=None)
    yield h
    h.close()


def test_proxy_environment_names_every_variable_clients_read() -> None:
    env = network.proxy_environment()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        assert env[name] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"


def test_attach_forwards_the_fixed_guest_port_to_this_kernels_proxy(hook: Any) -> None:
    vm = FakeVm()
    frames = hook.attach(Handle(vm))
    assert vm.forwards == [(3128, hook.proxy.port)]
    assert frames == [{"type": "network", "env": network.proxy_environment()}]
    # Every new VM (restore, pool hand-out) is attached again, to the same proxy.
    vm2 = FakeVm()
    hook.attach(Handle(vm2))
    assert vm2.forwards == [(3128, hook.proxy.port)]
    assert hook.take_report() == ""


def test_local_backend_guest_gets_the_proxy_address_itself(hook: Any) -> None:
    frames = hook.attach(Handle())
    assert frames[0]["env"]["HTTPS_PROXY"] == hook.proxy.url


def test_a_vm_that_cannot_forward_gets_no_environment_and_the_next_cell_says_why(hook: Any) -> None:
    empty = [{"type": "network", "env": {}}]  # what an earlier policy set goes
    assert hook.attach(Handle(FakeVm(fail=RuntimeError("unknown request")))) == empty
    report = hook.take_report()
    assert report.startswith("[network] this cell's guest has no network: the guest could not be "
                             "connected to the kernel's network proxy (unknown request)"), report
    assert "supermachine-kernel prepare" in report
    assert hook.take_report() == ""  # said once
    assert hook.attach(Handle(object())) == empty  # a runtime without forward_to_host
    assert "make .venv/.stamps/build" in hook.take_report()


def _ask(port: int, target: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        return s.makefile("rb").readline().decode()


def test_refused_connections_are_reported_once_each_with_a_count(hook: Any) -> None:
    for target in ("example.org:443", "example.org:443", "[::1]:80", "169.254.169.254:80"):
        status = _ask(hook.proxy.port, target)
        # The reason phrase itself says it: a client that shows only the status line shows it.
        assert status.startswith("HTTP/1.1 403 network access to "), status
    report = hook.take_report()
    assert report.splitlines() == [
        "[network] network access to example.org:443 is not allowed by this kernel's policy; an "
        'admin can allow it with c.MicroVMKernel.allow_network = ["example.org:443"] '
        "(2 connections)",
        "[network] network access to [::1]:80 is not allowed by this kernel's policy; an admin "
        'can allow it with c.MicroVMKernel.allow_network = ["[::1]:80"]',
        "[network] network access to 169.254.169.254:80 is not allowed by this kernel's policy; "
        'an admin can allow it with c.MicroVMKernel.allow_network = ["169.254.169.254:80"]',
    ]
    assert hook.take_report() == ""


def test_dropped_refusals_are_counted() -> None:
    assert network.describe_refusals(["a", "b", "a"], 7) == (
        "[network] a (2 connections)\n[network] b\n[network] (and 7 more refused connections)\n")


def test_without_a_policy_no_proxy_starts_and_each_guest_is_told_it_has_no_network() -> None:
    class Guest:
        attach_hooks: list = []

    class Kernel:
        allow_network: list[str] = []
        guest = Guest()

    assert network.start(Kernel()) is None
    assert [hook(Handle(FakeVm())) for hook in Guest.attach_hooks] == [
        [{"type": "network", "env": {}}]]


def test_start_gives_the_proxy_the_kernels_caps_and_hooks_the_guest(monkeypatch: Any) -> None:
    from supermachine_kernel import _core  # noqa: PLC0415

    made: list[tuple[list[str], dict]] = []

    class Proxy:
        port, url = 4321, "http://127.0.0.1:4321"

        def __init__(self, allow: list[str], **caps: Any) -> None:
            made.append((allow, caps))

        def close(self) -> None:
            pass

    class Kernel:
        allow_network = ["pypi.org"]
        network_max_connections = 5
        network_bandwidth = 1000

        class guest:  # noqa: N801 - stands for the GuestRepl
            attach_hooks: list[Any] = []

    monkeypatch.setattr(_core, "NetProxy", Proxy)
    hook = network.start(Kernel())
    assert hook is not None
    assert made == [(["pypi.org"], {"max_connections": 5, "bandwidth": 1000})]
    assert Kernel.guest.attach_hooks == [hook.attach]
    Kernel.network_bandwidth = 0  # 0 = no cap
    network.start(Kernel())
    assert made[-1][1]["bandwidth"] is None


CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_ca_certificates_go_with_the_environment(tmp_path: Any) -> None:
    h = network.NetworkHook(["pypi.org"], max_connections=1, bandwidth=None, ca_certificates=CERT)
    try:
        assert h.attach(Handle(FakeVm()))[0]["ca"] == CERT
    finally:
        h.close()


@pytest.mark.parametrize(("content", "why"), [
    (None, "cannot read"),
    (CERT + "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n", "private key"),
    ("not a certificate\n", "holds no PEM certificate"),
    ("x" * (network.MAX_CA_BYTES + 1), "is over 1024 KiB"),
])
def test_bad_ca_file_is_refused_when_the_config_loads(tmp_path: Any, content: str | None,
                                                      why: str) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TraitError, match=f"c.MicroVMKernel.network_ca_certificates: .*{why}"):
        GuestConfig(config=Config({"GuestConfig": {"network_ca_certificates": str(path)}}))
    path.write_text(CERT)
    cfg = GuestConfig(config=Config({"GuestConfig": {"network_ca_certificates": str(path)}}))
    assert cfg.network_ca_certificates == str(path)


def test_proxy_that_cannot_start_is_a_network_error() -> None:
    def broken(*_a: Any, **_k: Any) -> Any:
        raise OSError("address in use")

    with pytest.raises(network.NetworkError, match="network proxy did not start: address in use"):
        network.NetworkHook(["pypi.org"], max_connections=1, bandwidth=None, proxy_factory=broken)


def test_cap_traits_default_and_validation() -> None:
    cfg = GuestConfig()
    assert (cfg.network_max_connections, cfg.network_bandwidth) == (64, 0)
    with pytest.raises(TraitError, match="network_max_connections must be at least 1, not 0"):
        GuestConfig(config=Config({"GuestConfig": {"network_max_connections": 0}}))
    with pytest.raises(TraitError, match="network_bandwidth must be at least 0, not -5"):
        GuestConfig(config=Config({"GuestConfig": {"network_bandwidth": -5}}))

