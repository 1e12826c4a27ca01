"""The runtime tour printed by `make demo` before the notebook: image, boot, exec, files, timings.

Each step says what it did and how long it took, so a reader sees the engine at work:
which accelerator, how long a cold boot takes, how fast an exec round trip is, and (when the
runtime has snapshots) how much faster a restore is than a cold boot.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def _step(label: str, fn: Callable[[], T]) -> T:
    t = time.perf_counter()
    result = fn()
    print(f"  {label:<52} {(time.perf_counter() - t) * 1000:9.1f} ms")
    return result


def run() -> None:
    from ..api import Image

    print("runtime tour: one microVM from the default image")
    image = _step("ensure image + warm snapshot (cached after first build)", lambda: Image.build())
    cold = _step("cold boot -> agent answers", image.cold_boot)
    with cold:
        _step("  exec `true` in the cold-booted VM", lambda: cold.exec(["true"]))
    vm = _step("restore from the snapshot -> agent answers", image.boot)
    with vm:
        print(f"    accelerator: {vm.accel}, QEMU pid {vm.qemu_pid}")
        r = _step("exec python3 in the guest", lambda: vm.exec(
            ["python3", "-c", "import sys, platform; print(platform.python_version(), platform.node(), sys.platform)"]))
        print(f"    guest says: {r.stdout.decode().strip()} (exit {r.exit_code})")
        _step("exec `true` (round trip)", lambda: vm.exec(["true"]))
        r = _step("import numpy, pandas, matplotlib in the guest (cold)", lambda: vm.exec(
            ["python3", "-c", "import numpy, pandas, matplotlib; print(numpy.__version__, pandas.__version__)"]))
        print(f"    numpy/pandas: {r.stdout.decode().strip()}")
        payload = os.urandom(8 << 20)
        _step("write an 8 MiB file into the guest", lambda: vm.write_file("/tmp/tour.bin", payload))
        back = _step("read it back", lambda: vm.read_file("/tmp/tour.bin"))
        same = hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()
        print(f"    round trip intact: {same}")
        r = _step("list network interfaces in the guest", lambda: vm.exec(["ls", "/sys/class/net"]))
        print(f"    interfaces: {r.stdout.decode().split()}")
        r = _step("exec with a 1 s timeout (`sleep 10`)", lambda: vm.exec(["sleep", "10"], timeout_ms=1000))
        print(f"    exit_code {r.exit_code}, timed_out {r.timed_out}")
    print("  VM released (QEMU process gone)")
