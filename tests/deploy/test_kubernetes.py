"""deploy/kubernetes/: the manifests validate against Kubernetes' own schemas, and the
zero-to-jupyterhub values keep the promises its guide makes (only microVM kernels, KVM through a
device plugin with a TCG profile beside it, memory sized for the kernel's guests, no metadata
egress).

The z2jh chart's values schema is not on any registry this project installs from, so the values
file is checked in two parts: the Kubernetes objects it carries (resources, NetworkPolicy rules)
against the Kubernetes schemas, and its settings against what the kernel does."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES = "1.30.0"  # the oldest release the guide supports
KERNELSPECS = Path(__file__).resolve().parents[2] / "kernelspecs"


def _values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def _manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "values.yaml")


def _validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def _mib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?", str(quantity))
    assert m, f"not a memory quantity: {quantity!r}"
    scale = {None: 1 / 2**20, "Ki": 1 / 1024, "Mi": 1, "Gi": 1024,
             "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[m.group(2)]
    return float(m.group(1)) * scale


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_each_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        _validate(doc)


def test_a_broken_manifest_is_caught() -> None:
    """The validator is strict: a misspelt field fails (so the test above can fail)."""
    doc = yaml.safe_load((DEPLOY / "kvm-device-plugin.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(doc)


def test_the_user_pod_parts_of_the_values_are_valid_kubernetes() -> None:
    single = _values()["singleuser"]
    memory, cpu = single["memory"], single["cpu"]
    container = {
        "name": "notebook", "image": f"{single['image']['name']}:{single['image']['tag']}",
        "resources": {"requests": {"memory": memory["guarantee"], "cpu": str(cpu["guarantee"])},
                      "limits": {"memory": memory["limit"], "cpu": str(cpu["limit"])}},
        "securityContext": {"allowPrivilegeEscalation": single["allowPrivilegeEscalation"],
                            "runAsUser": single["uid"]},
    }
    for profile in single["profileList"]:
        limits = profile["kubespawner_override"].get("extra_resource_limits", {})
        container["resources"]["limits"].update(limits)
        _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jupyter-u"},
                   "spec": {"containers": [container]}})
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "singleuser"},
              "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": single["networkPolicy"]["egress"]}}
    _validate(policy)


def test_only_the_microvm_kernelspecs_are_offered() -> None:
    extra = _values()["hub"]["extraConfig"]["microvm-only-kernels"]
    names = set(re.findall(r"allowed_kernelspecs=\{([^}]*)\}", extra)[0].replace("'", "").split(","))
    assert names == {p.name for p in KERNELSPECS.iterdir() if (p / "kernel.json").exists()}
    assert "ensure_native_kernel=False" in extra


def test_kvm_comes_from_the_device_plugin_and_tcg_is_the_fallback() -> None:
    plugin = yaml.safe_load((DEPLOY / "kvm-device-plugin.yaml").read_text())
    args = "\n".join(plugin["spec"]["template"]["spec"]["containers"][0]["args"])
    device = yaml.safe_load(args.split("--device", 1)[1])
    assert device["groups"][0]["paths"][0]["path"] == "/dev/kvm"
    resource = f"squat.ai/{device['name']}"
    profiles = _values()["singleuser"]["profileList"]
    kvm = [p for p in profiles if resource in p["kubespawner_override"].get("extra_resource_limits", {})]
    tcg = [p for p in profiles if resource not in p["kubespawner_override"].get("extra_resource_limits", {})]
    assert len(kvm) == 1 and len(tcg) == 1
    # a snapshot restores only under the accelerator it was baked with: two image variants
    assert kvm[0]["kubespawner_override"]["image"] != tcg[0]["kubespawner_override"]["image"]


def test_memory_is_sized_for_the_kernels_guests() -> None:
    from supermachine_kernel.kernel.config import GuestConfig  # noqa: PLC0415

    guest_mib = GuestConfig.class_traits()["memory_mib"].default_value
    limit = _mib(_values()["singleuser"]["memory"]["limit"])
    server_mib, kernel_process_mib, qemu_overhead_mib = 150, 50, 120  # measured: values.yaml
    per_kernel = guest_mib + kernel_process_mib + qemu_overhead_mib
    assert (limit - server_mib) // per_kernel >= 4, (
        f"{limit:.0f} MiB holds fewer than 4 kernels of {per_kernel} MiB")


def test_egress_never_reaches_the_metadata_service_or_private_ranges() -> None:
    policy = _values()["singleuser"]["networkPolicy"]
    assert policy["enabled"] is True
    rules = policy["egressAllowRules"]
    assert not rules["cloudMetadataServer"] and not rules["privateIPs"]
    metadata = ipaddress.ip_address("169.254.169.254")
    for rule in policy["egress"]:
        for peer in rule["to"]:
            block = peer["ipBlock"]
            if metadata in ipaddress.ip_network(block["cidr"]):
                assert any(metadata in ipaddress.ip_network(e) for e in block.get("except", []))
