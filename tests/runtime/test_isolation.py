"""What the guest can and cannot see, and what PID 1 does for it (real microVMs only)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def test_accelerator_is_reported(qemu_vm):
    assert qemu_vm.accel in ("kvm", "tcg")
    assert qemu_vm.qemu_pid is not None


def test_only_loopback_network_interface(qemu_vm):
    r = qemu_vm.exec(["ls", "/sys/class/net"])
    assert r.stdout.split() == [b"lo"]


def test_host_files_are_not_visible(qemu_vm, tmp_path):
    marker = Path("/tmp") / f"supermachine-marker-{uuid.uuid4().hex}"
    marker.write_text("host secret")
    try:
        r = qemu_vm.exec(["sh", "-c", f"test -e {marker} && echo VISIBLE || echo absent"])
        assert r.stdout == b"absent\n"
        r = qemu_vm.exec(["sh", "-c", f"find / -xdev -name {marker.name} 2>/dev/null | head -1"])
        assert r.stdout == b""
    finally:
        marker.unlink()


def test_root_is_overlay_on_readonly_image(qemu_vm):
    # writes land in the tmpfs upper layer; the image itself is read-only
    r = qemu_vm.exec(["sh", "-c", "echo x > /etc/written-by-test && cat /etc/written-by-test"])
    assert r.stdout == b"x\n"
    mounts = qemu_vm.read_file("/proc/mounts").decode()
    assert " / overlay " in mounts, mounts


def zombies(vm) -> list:
    r = vm.exec(["sh", "-c", "for s in /proc/[0-9]*/stat; do cat $s 2>/dev/null; echo; done"])
    out = []
    for line in r.stdout.decode(errors="replace").splitlines():
        if ")" in line and line[line.rindex(")") + 2 : line.rindex(")") + 3] == "Z":
            out.append(line[:80])
    return out


def test_orphans_are_reaped(qemu_vm):
    # Each `sh` leaves a background child, then execs into a process that never waits for it:
    # when that process exits, the orphan is reparented to PID 1, which must reap it.
    for _ in range(5):
        r = qemu_vm.exec(["sh", "-c", "sleep 0.2 & sleep 0.1 & exec sleep 0.5"])
        assert r.exit_code == 0
    r = qemu_vm.exec(["sh", "-c", "(sleep 0.3 &) ; (true &) ; echo done"])
    assert r.stdout == b"done\n"
    qemu_vm.exec(["sleep", "1"])
    assert zombies(qemu_vm) == []
