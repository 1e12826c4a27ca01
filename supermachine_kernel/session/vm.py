"""VM backend: the guest REPL in a microVM taken from a warm pool of a warmed image snapshot.

`supermachine_kernel.api` (and with it the compiled `_core`) is imported only when a VM is first
needed, so the local backend and the kernel's tests work without the runtime.

The image is built (or found cached) once per kernel process with a warmup that imports the
configured modules, so the snapshot every VM restores from already holds them in page cache and
the REPL's own imports are fast. Each launch takes a VM from the pool, writes the driver into it
and spawns it; release returns the VM (the pool restores it to the clean snapshot).
"""
from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import threading
from typing import Any, Callable

log = logging.getLogger("supermachine_kernel.session.vm")

GUEST_DRIVER_PATH = "/tmp/supermachine-repl.py"


def _api():
    from .. import api  # noqa: PLC0415 - lazy on purpose: needs the compiled runtime

    return api


class VmHandle:
    def __init__(self, vm: Any, child: Any, release: Any, where: str) -> None:
        self.vm = vm
        self.child = child
        self._release = release
        self._where = where
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self.child.signal(9)
        except Exception:  # noqa: BLE001 - the VM may be gone already
            pass
        self._release()

    def describe(self) -> str:
        return self._where


class VmBackend:
    name = "vm"
    isolated = True

    def __init__(
        self,
        image: str = "default",
        memory_mib: int = 512,
        vcpus: int = 1,
        pool_min: int = 1,
        pool_max: int = 2,
        accelerator: str = "auto",
        warmup_imports: list[str] | None = None,
        use_pool: bool = True,
    ) -> None:
        self.image_ref = image
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.accelerator = accelerator
        self.warmup_imports = list(warmup_imports or [])
        self.use_pool = use_pool
        self._image: Any = None
        self._pool: Any = None
        self._spare: concurrent.futures.Future | None = None
        self._closed = False
        self._lock = threading.Lock()

    def _warmup_code(self) -> str:
        lines = ["import importlib"]
        for mod in self.warmup_imports:
            lines.append(f"try:\n    importlib.import_module({mod!r})\nexcept Exception:\n    pass")
        return "\n".join(lines)

    def _ensure(self) -> None:
        with self._lock:
            if self._image is not None:
                return
            if self.accelerator and self.accelerator != "auto":
                os.environ.setdefault("SUPERMACHINE_ACCEL", self.accelerator)
            api = _api()
            kwargs: dict[str, Any] = {
                "ref": None if self.image_ref in ("", "default") else self.image_ref,
                "memory_mib": self.memory_mib,
                "vcpus": self.vcpus,
            }
            params = inspect.signature(api.Image.build).parameters
            if "progress" in params:
                kwargs["progress"] = False
            if self.warmup_imports and "warmup" in params:
                warmup_code = self._warmup_code()

                def warmup(vm: Any) -> None:
                    vm.exec(["python3", "-c", warmup_code], timeout_ms=600_000)

                kwargs["warmup"] = warmup
                kwargs["warmup_tag"] = "kernel:" + ",".join(self.warmup_imports)
            self._image = api.Image.build(**kwargs)
            if self.use_pool and hasattr(self._image, "pool"):
                self._pool = self._image.pool(min=self.pool_min, max=self.pool_max)

    # Until the runtime's pool is available, keep one cold-booted spare VM ready so that a
    # restart after a guest death does not wait for a boot.
    def _boot_spare_later(self) -> None:
        if self._pool is not None or self.pool_min < 1 or self._closed:
            return
        with self._lock:
            if self._spare is not None:
                return
            self._spare = concurrent.futures.Future()
            fut = self._spare

        def boot() -> None:
            try:
                fut.set_result(self._image.boot())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        threading.Thread(target=boot, name="vm-spare-boot", daemon=True).start()

    def _take_vm(self) -> tuple[Any, Callable[[], None]]:
        if self._pool is not None:
            cm = self._pool.acquire()
            vm = cm.__enter__()
            return vm, lambda: cm.__exit__(None, None, None)
        with self._lock:
            spare, self._spare = self._spare, None
        vm = None
        if spare is not None:
            try:
                vm = spare.result()
                if not vm.alive:
                    vm.release()
                    vm = None
            except Exception:  # noqa: BLE001 - boot the normal way and report that error
                vm = None
        if vm is None:
            vm = self._image.boot()
        return vm, vm.release

    def launch(self, driver: bytes, env: dict[str, str]) -> VmHandle:
        self._ensure()
        vm, release = self._take_vm()
        try:
            vm.write_file(GUEST_DRIVER_PATH, driver, mode=0o644)
            child = vm.spawn(["python3", "-u", GUEST_DRIVER_PATH], env=env, cwd="/root")
        except BaseException:
            release()
            raise
        accel = getattr(vm, "accel", None)
        where = f"microVM {getattr(vm, 'id', '?')}" + (f" ({accel})" if accel else "")
        self._boot_spare_later()
        return VmHandle(vm, child, release, where)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.add_done_callback(lambda f: f.exception() is None and f.result().release())
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("pool shutdown failed")
