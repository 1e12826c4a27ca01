"""Boot the cached default image's kernel + initramfs + rootfs under QEMU with a busybox /init.

This checks the guest artefacts themselves, independent of the agent: the modules load in
`/modules/order`, the root image appears as /dev/vda and mounts as erofs under a tmpfs
overlay, and the guest's Python imports numpy from precompiled bytecode (nothing compiled into
the overlay). A second cpio archive appended to our initrd replaces /init (the kernel unpacks
concatenated archives in order).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from supermachine_kernel import images

pytestmark = pytest.mark.vm

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "MODFAIL $m"; done
echo "MODULES $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
mount -t erofs -o ro /dev/vda /mnt/lower && echo "EROFS OK"
mount -t tmpfs tmpfs /mnt/upper
mkdir -p /mnt/upper/data /mnt/upper/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/upper/data,workdir=/mnt/upper/work /mnt/root && echo "OVERLAY OK"
mount -t proc proc /mnt/root/proc
chroot /mnt/root /usr/bin/python3 -c 'import sys, numpy; print("PY", sys.version.split()[0], "numpy", numpy.__version__)'
echo "UPPER $(find /mnt/upper/data -name '*.pyc' | wc -l) pyc"
echo "DONE"
poweroff -f
"""


def _tsc_khz() -> str:
    """tsc_early_khz=<host TSC kHz>: without it microvm boots sometimes hang calibrating the TSC."""
    try:
        return f" tsc_early_khz={int(Path('/sys/devices/system/cpu/cpu0/tsc_freq_khz').read_text())}"
    except (OSError, ValueError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return f" tsc_early_khz={round(float(line.split(':')[1]) * 1000)}"
    return ""


def _extra_cpio(tmp: Path) -> bytes:
    root = tmp / "extra"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    names = "init\nbin\nbin/busybox\n"
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names.encode(),
                          capture_output=True, check=True).stdout


@pytest.mark.timeout(300)
def test_default_image_boots_and_imports_numpy(tmp_path: Path):
    for tool in ("qemu-system-x86_64", "cpio"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not Path("/bin/busybox").is_file():
        pytest.skip("busybox-static not installed")
    p = images.ensure_image(progress=False, agent="/bin/busybox")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(Path(p.initrd).read_bytes() + _extra_cpio(tmp_path))
    accel = "kvm" if os.environ.get("SUPERMACHINE_ACCEL") == "kvm" else "tcg"
    cmd = [
        "qemu-system-x86_64", "-M", "microvm,acpi=on,x-option-roms=off,pcie=off",
        "-accel", accel, "-cpu", "max", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-kernel", p.kernel, "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet" + _tsc_khz(),
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=root,file={p.rootfs},format=raw,if=none,readonly=on",
        "-no-reboot",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240).stdout
    assert "DONE" in out, out
    assert "MODFAIL" not in out, out
    loaded = out.split("MODULES ", 1)[1].split("\n", 1)[0].split()
    assert set(p.modules) <= set(loaded), out
    assert "EROFS OK" in out and "OVERLAY OK" in out, out
    assert f"PY {p.python_version}" in out and "numpy 2." in out, out
    assert "UPPER 0 pyc" in out, "python wrote bytecode into the overlay: image pycs are stale"
