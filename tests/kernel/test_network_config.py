"""`c.MicroVMKernel.allow_network` (kernel/config.py): default deny, entries validated when the
config is loaded (a kernel with a bad entry does not start, and says which entry and why)."""
from __future__ import annotations

import pytest
from traitlets import TraitError
from traitlets.config import Config

from supermachine_kernel.kernel.config import GuestConfig


def test_default_is_deny_all() -> None:
    assert GuestConfig().allow_network == []


def test_good_entries_are_kept() -> None:
    entries = ["pypi.org", "files.pythonhosted.org", "*.example.com:443", "10.1.0.0/16:5432",
               "[2001:db8::/32]:443"]
    cfg = GuestConfig(config=Config({"GuestConfig": {"allow_network": entries}}))
    assert cfg.allow_network == entries


@pytest.mark.parametrize(("entry", "reason"), [
    ("https://pypi.org", "it looks like a URL"),
    ("10.1.2.3/16", "host bits must be zero"),
    ("pypi.org:99999", "is not a port"),
    ("foo.*.com", "'*' is allowed only as the whole first label"),
])
def test_bad_entry_is_refused_with_a_clear_error(entry: str, reason: str) -> None:
    with pytest.raises(TraitError) as info:
        GuestConfig(config=Config({"GuestConfig": {"allow_network": ["pypi.org", entry]}}))
    msg = str(info.value)
    assert msg.startswith(f'c.MicroVMKernel.allow_network: bad allow_network entry "{entry}"'), msg
    assert reason in msg


def test_the_kernel_class_has_the_validated_trait() -> None:
    from supermachine_kernel.kernel.microvm import MicroVMKernel  # noqa: PLC0415 - ipykernel import

    assert issubclass(MicroVMKernel, GuestConfig)  # so c.MicroVMKernel.allow_network is validated
    assert "allow_network" in MicroVMKernel.class_trait_names(config=True)
