"""The guest REPL's network environment (guest/repl.py:set_network), as the kernel sends it
after every attach: a policy's proxy variables are set, and a later attach without a policy (a
REPL from a snapshot taken under one, restored into a kernel without one) removes them again,
leaving any value the user or the image set on its own."""
from __future__ import annotations

import os

import pytest

POLICY = {"HTTP_PROXY": "http://127.0.0.1:3128", "HTTPS_PROXY": "http://127.0.0.1:3128",
          "http_proxy": "http://127.0.0.1:3128", "NO_PROXY": "localhost,127.0.0.1,::1"}
KEYS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
        "all_proxy", "no_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT",
        "CURL_CA_BUNDLE", "PIP_BREAK_SYSTEM_PACKAGES", "PIP_ROOT_USER_ACTION",
        "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_CACHE_DIR")


@pytest.fixture
def net(repl, monkeypatch, tmp_path):
    """The driver, with this process's environment restored afterwards as a whole: set_network
    writes os.environ directly, and a proxy variable left behind sends every later test's
    HTTP (pip in the Hub and image tests) to a proxy that is not there."""
    saved = dict(os.environ)
    for key in KEYS:
        os.environ.pop(key, None)
    monkeypatch.setattr(repl, "NETWORK_CA_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setitem(repl.network, "on", False)
    monkeypatch.setitem(repl.network, "set", {})
    yield repl
    os.environ.clear()
    os.environ.update(saved)


def test_a_policy_sets_the_proxy_and_pip_variables(net) -> None:
    net.set_network(POLICY)
    assert net.network["on"] is True
    assert {k: os.environ[k] for k in POLICY} == POLICY
    assert os.environ["PIP_NO_CACHE_DIR"] == "1"


def test_no_policy_after_one_removes_what_it_set(net) -> None:
    net.set_network(POLICY, "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    assert os.environ["SSL_CERT_FILE"] == net.NETWORK_CA_FILE
    net.set_network({})  # restored into a kernel without a policy
    assert net.network["on"] is False
    assert [k for k in KEYS if k in os.environ] == []


def test_values_set_by_others_stay(net) -> None:
    os.environ["PIP_NO_CACHE_DIR"] = "0"  # the image's own, before any policy
    net.set_network(POLICY)
    assert os.environ["PIP_NO_CACHE_DIR"] == "0", "a policy overrode the image's pip setting"
    os.environ["HTTPS_PROXY"] = "http://user-choice:8080"  # the user changed one since
    net.set_network({})
    assert os.environ["HTTPS_PROXY"] == "http://user-choice:8080"
    assert os.environ["PIP_NO_CACHE_DIR"] == "0"
    assert "HTTP_PROXY" not in os.environ


def test_no_policy_ever_changes_nothing(net) -> None:
    os.environ["HTTP_PROXY"] = "http://corporate:3128"  # e.g. an OCI image's Env
    net.set_network({})
    assert os.environ["HTTP_PROXY"] == "http://corporate:3128"
    assert net.network["on"] is False


def test_the_environment_is_restored_after_each_test() -> None:
    """Runs after the tests above (file order): none of their variables is left."""
    assert [k for k in KEYS if os.environ.get(k, "").startswith("http://127.0.0.1:3128")] == []


def test_only_network_names_are_taken(net) -> None:
    net.set_network({"LD_PRELOAD": "/tmp/x.so", "HTTP_PROXY": "a\0b", "ALL_PROXY": "http://p"})
    assert "LD_PRELOAD" not in os.environ and "HTTP_PROXY" not in os.environ
    assert os.environ["ALL_PROXY"] == "http://p"
