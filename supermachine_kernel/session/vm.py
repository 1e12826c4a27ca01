"""VM backend: the guest REPL in a microVM taken from a warm pool of a warmed image snapshot.

`supermachine_kernel.api` (and with it the compiled `_core`) is imported only when a VM is first
needed, so the local backend and the kernel's tests work without the runtime.

The image is built (or found cached) once per kernel process with a warmup that imports the
configured modules, so the snapshot every VM restores from already holds them in page cache and
the REPL's own imports are fast. Each launch takes a VM from the pool, writes the driver into it
and spawns it; release returns the VM (the pool restores it to the clean snapshot).
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from typing import Any, Callable

from .backend import PREIMPORT_ENV, SpareKeeper, read_ready_frame

log = logging.getLogger("supermachine_kernel.session.vm")

GUEST_DRIVER_PATH = "/tmp/supermachine-repl.py"


def _api():
    from .. import api  # noqa: PLC0415 - lazy on purpose: needs the compiled runtime

    return api


class VmHandle:
    prestarted = False

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
        self._recipe: tuple[bytes, dict[str, str]] | None = None
        self._spares = SpareKeeper(self._start_spare, lambda h: h.vm.alive and h.child.poll() is None) \
            if pool_min > 0 else None
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

    def _take_vm(self) -> tuple[Any, Callable[[], None]]:
        if self._pool is not None:
            cm = self._pool.acquire()
            vm = cm.__enter__()
            return vm, lambda: cm.__exit__(None, None, None)
        vm = self._image.boot()
        return vm, vm.release

    def _spawn(self, driver: bytes, env: dict[str, str]) -> VmHandle:
        vm, release = self._take_vm()
        try:
            vm.write_file(GUEST_DRIVER_PATH, driver, mode=0o644)
            child = vm.spawn(["python3", "-u", GUEST_DRIVER_PATH], env=env, cwd="/root")
        except BaseException:
            release()
            raise
        accel = getattr(vm, "accel", None)
        where = f"microVM {getattr(vm, 'id', '?')}" + (f" ({accel})" if accel else "")
        return VmHandle(vm, child, release, where)

    # Until the runtime's snapshot pool is available, keep one VM with the REPL already started
    # and the warmup modules imported, so a restart (or a death) does not wait for a boot.
    def _start_spare(self) -> VmHandle:
        assert self._recipe is not None
        driver, env = self._recipe
        handle = self._spawn(driver, dict(env, **{PREIMPORT_ENV: ",".join(self.warmup_imports)}))
        try:
            read_ready_frame(handle.child, timeout=900)
        except BaseException:
            handle.release()
            raise
        handle.prestarted = True
        return handle

    def launch(self, driver: bytes, env: dict[str, str]) -> VmHandle:
        self._ensure()
        spare = None
        if self._recipe != (driver, env):
            self._recipe = (driver, env)
        elif self._spares is not None:
            spare = self._spares.take()
        return spare or self._spawn(driver, env)

    def prepare_spare(self) -> None:
        if self._spares is not None and self._pool is None and self._recipe is not None:
            self._spares.refill()

    def close(self) -> None:
        if self._spares is not None:
            self._spares.close()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("pool shutdown failed")
