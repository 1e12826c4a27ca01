"""%vm: accelerator, memory, vcpus, image, uptime, lineage."""
from __future__ import annotations

import re


def test_vm_facts_and_lineage(kernel):
    out = kernel.ok("%vm")
    facts = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.strip().splitlines())
    assert facts["accelerator"].split()[0] in ("tcg", "kvm")
    assert re.match(r"\d+ MiB", facts["memory"])
    assert facts["vcpus"] == "1"
    assert facts["image"].startswith("default")
    assert re.search(r"[\d.]+ (s|min)", facts["uptime"])
    assert facts["lineage"].startswith("fresh start")
    assert facts["notebook"].endswith("vm.ipynb")

    kernel.ok("%snapshot a")
    kernel.ok("%snapshot b")
    kernel.ok("%restore b")
    out = kernel.ok("%vm")
    assert "b <- a <- fresh start" in out
    assert "restored from 'b'" in out


def test_help(kernel):
    reply, _ = kernel.execute("%vm?")
    assert "accelerator" in reply["payload"][0]["data"]["text/plain"]
