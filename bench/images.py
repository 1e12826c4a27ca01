"""Benchmark: a guest image pulled from an OCI registry, each figure beside the default image's.

The OCI image is Debian bookworm with python3 only (the layout of tests/image/debian_layout.py,
which the tests use too: cached under <cache>/test/, built with mmdebstrap when absent),
pushed with skopeo to a docker-registry this bench starts on 127.0.0.1 (plain HTTP, loopback)
and built with the kernel layer. The default image is the built-in recipe (mmdebstrap + pinned
wheels). Everything is built in a scratch cache directory (only the guest kernel and initramfs,
which are ours and shared by every image, are linked in from the real cache), so no figure
depends on what the machine built before.

Figures (OCI image | default image | ratio):
  pull+bake, cold layer store: Image.build() into the fresh cache: every blob pulled and
    verified (default: mmdebstrap and pip), layers unpacked, the kernel layer resolved and
    installed by the host's pip, mkfs.erofs, then the snapshot baked (cold boot + snapshot);
  pull+bake, warm layer store: the same after removing the cache's images/ and snapshots/:
    blobs and package layers are there, root and snapshot are built again (the built-in
    recipe has no layer store: it runs mmdebstrap and pip again);
  cache-hit Image.build(): image and snapshot cached, median and p95 over --rounds (the OCI
    reference's tag is still resolved at the registry; issue 12 target: < 100 ms);
  kernel prepare: the first start of a kernel on the image until a `1+1` cell answered; it
    bakes the kernel's warm snapshot (REPL started, warmup imports), as
    `supermachine-kernel prepare` does;
  kernel start after prepare: a new kernel process until kernel_info answered, and until
    `1+1` answered; the first start after prepare, and the median over --starts starts of the
    two kernels interleaved (on a shared machine one start varies by 2x).
The kernels run from kernelspecs written to a scratch directory, argv
`python -m supermachine_kernel.kernel -f {connection_file} --MicroVMKernel.image=REF` with
SUPERMACHINE_CACHE_DIR set to the scratch cache.

Needs docker-registry, skopeo and network access to Debian's mirror and PyPI (the cold builds).

Run: .venv/bin/python bench/images.py [--rounds 20] [--starts 5] [--keep DIR] [--verbose]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import median, percentile, print_table
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from supermachine_kernel import api
from supermachine_kernel import images

REPO = "bench/debian-python3:v1"
SHARED = ("kernels", "initramfs")  # ours, the same for every image
# After each kernel start: its background work (the pool restoring its next VM) is over.
SETTLE_S = 4.0


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench/images.py needs `{tool}`: apt-get install {package} (tools/setup-host.sh)")
    return path


def _debian_layout_module() -> types.ModuleType:
    """tests/image/debian_layout.py (the builder the tests use), loaded by its path."""
    path = Path(__file__).resolve().parent.parent / "tests" / "image" / "debian_layout.py"
    spec = importlib.util.spec_from_file_location("smk_debian_layout", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def debian_python_layout() -> Path:
    """oci:<layout>:v1, Debian bookworm with python3 and python3-six: the test's layout, in
    the same place (either builds it for both)."""
    layout = _debian_layout_module()
    try:
        return layout.debian_python_layout(images.cache_dir(), note=lambda m: print(m, flush=True))
    except layout.CannotBuild as e:
        sys.exit(f"bench/images.py: {e}")


class LocalRegistry:
    """docker-registry on 127.0.0.1 (plain HTTP, no auth) until stop()."""

    def __init__(self, workdir: Path) -> None:
        binary = need("docker-registry", "docker-registry")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.addr = f"127.0.0.1:{port}"
        (workdir / "registry.yml").write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {workdir / 'registry-data'}\nhttp:\n  addr: {self.addr}\n")
        with open(workdir / "registry.log", "wb") as log:
            self.proc = subprocess.Popen([binary, "serve", str(workdir / "registry.yml")],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    sys.exit(f"docker-registry did not start; see {workdir / 'registry.log'}")
                time.sleep(0.05)

    def push(self, layout: Path, tag: str, repo: str) -> str:
        skopeo = need("skopeo", "skopeo")
        dest = f"{self.addr}/{repo}"
        subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests",
                        "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{dest}"],
                       check=True)
        return dest

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def fresh_cache(path: Path) -> Path:
    path.mkdir(parents=True)
    real = Path(images.cache_dir())
    for name in SHARED:
        if (real / name).is_dir():
            (path / name).symlink_to(real / name)
    return path


def timed_build(ref: str | None, cache: Path, verbose: bool) -> float:
    """Seconds for Image.build (image and snapshot) into `cache`; the bake VM is released."""
    t = time.perf_counter()
    img = api.Image.build(ref=ref, cache_dir=cache, snapshots_dir=cache / "snapshots",
                          progress=verbose)
    dt = time.perf_counter() - t
    del img  # releases the bake VM it holds for a first boot
    gc.collect()
    return dt


def forget_images(cache: Path) -> None:
    """The warm state: blobs and package layers stay; images and snapshots go."""
    for name in ("images", "snapshots"):
        shutil.rmtree(cache / name, ignore_errors=True)


def cache_hits(ref: str | None, cache: Path, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        img = api.Image.build(ref=ref, cache_dir=cache, snapshots_dir=cache / "snapshots",
                              progress=False)
        out.append(time.perf_counter() - t)
        assert img.snapshot is not None
    return out


def write_spec(kernels: Path, name: str, ref: str, cache: Path) -> None:
    d = kernels / name
    d.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "supermachine_kernel.kernel", "-f", "{connection_file}",
                 f"--MicroVMKernel.image={ref}"],
        "display_name": f"bench {name}", "language": "python", "interrupt_mode": "message",
        "env": {"SUPERMACHINE_CACHE_DIR": str(cache)},
    }
    (d / "kernel.json").write_text(json.dumps(spec))


def kernel_start(specs: KernelSpecManager, name: str, timeout: float) -> tuple[float, float]:
    """(launch -> kernel_info answered, launch -> `1+1` answered) of a new kernel process."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=specs)
    t0 = time.perf_counter()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
        info = time.perf_counter() - t0
        reply = kc.execute_interactive("1+1", timeout=timeout, output_hook=lambda msg: None)
        done = time.perf_counter() - t0
        c = reply["content"]
        if c["status"] != "ok":
            raise RuntimeError(f"kernel {name}: `1+1` failed: {c.get('ename')}: {c.get('evalue')}")
        return info, done
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="cache-hit builds to time")
    ap.add_argument("--starts", type=int, default=5, help="kernel starts after prepare, each kernel")
    ap.add_argument("--keep", help="build in this (new) directory and keep it, instead of a temp dir")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for a kernel to answer")
    ap.add_argument("--verbose", action="store_true", help="show the builds' progress")
    args = ap.parse_args()

    layout = debian_python_layout()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="smk-bench-images-"))
    work.mkdir(parents=True, exist_ok=True)
    reg = LocalRegistry(work)
    try:
        t = time.perf_counter()
        ref = reg.push(layout, "v1", REPO)
        print(f"pushed {ref} ({time.perf_counter() - t:.1f} s); scratch {work}", flush=True)
        caches = {"oci": fresh_cache(work / "cache-oci"), "default": fresh_cache(work / "cache-default")}
        refs: dict[str, str | None] = {"oci": ref, "default": None}
        res: dict[str, dict[str, float]] = {k: {} for k in refs}
        for kind in ("oci", "default"):
            res[kind]["cold"] = timed_build(refs[kind], caches[kind], args.verbose)
            print(f"{kind}: pull+bake, cold store {res[kind]['cold']:.1f} s", flush=True)
            forget_images(caches[kind])
            res[kind]["warm"] = timed_build(refs[kind], caches[kind], args.verbose)
            print(f"{kind}: pull+bake, warm store {res[kind]['warm']:.1f} s", flush=True)
        for kind in ("oci", "default"):
            hits = cache_hits(refs[kind], caches[kind], args.rounds)
            res[kind]["hit_p50"], res[kind]["hit_p95"] = median(hits), percentile(hits, 95)

        kernels = work / "kernels"
        for kind, kind_ref in refs.items():
            write_spec(kernels, f"bench-{kind}", kind_ref or "default", caches[kind])
        specs = KernelSpecManager(kernel_dirs=[str(kernels)])
        for kind in ("oci", "default"):
            _, res[kind]["prepare"] = kernel_start(specs, f"bench-{kind}", args.timeout)
            print(f"{kind}: kernel prepare {res[kind]['prepare']:.1f} s", flush=True)
            time.sleep(SETTLE_S)
        starts: dict[str, list[tuple[float, float]]] = {k: [] for k in refs}
        for _ in range(args.starts):
            for kind in ("oci", "default"):
                starts[kind].append(kernel_start(specs, f"bench-{kind}", args.timeout))
                time.sleep(SETTLE_S)
        for kind, got in starts.items():
            res[kind]["first_info"], res[kind]["first_cell"] = got[0]
            res[kind]["info"] = median([i for i, _ in got])
            res[kind]["cell"] = median([c for _, c in got])
    finally:
        reg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    o, d = res["oci"], res["default"]
    rows = [
        ("pull+bake, cold layer store", o["cold"], d["cold"], "s"),
        ("pull+bake, warm layer store", o["warm"], d["warm"], "s"),
        ("cache-hit Image.build() p50", o["hit_p50"], d["hit_p50"], "ms"),
        ("cache-hit Image.build() p95", o["hit_p95"], d["hit_p95"], "ms"),
        ("kernel prepare (bakes its snapshot) -> 1+1", o["prepare"], d["prepare"], "s"),
        ("first start after prepare -> kernel_info", o["first_info"], d["first_info"], "ms"),
        ("first start after prepare -> 1+1", o["first_cell"], d["first_cell"], "ms"),
        (f"start after prepare -> kernel_info, p50/{args.starts}", o["info"], d["info"], "ms"),
        (f"start after prepare -> 1+1, p50/{args.starts}", o["cell"], d["cell"], "ms"),
    ]
    print_table(f"images: {REPO} (OCI, + kernel layer) vs the default image", rows, "OCI", "default")
    print(f"goal: cache-hit Image.build(ref=...) < 100 ms (p50 here {o['hit_p50'] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
