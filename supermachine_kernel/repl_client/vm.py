"""VM backend: the guest REPL in a microVM, warm before anyone asks for it.

`supermachine_kernel.api` (and with it the compiled `_core`) is imported only when a VM is first
needed, so the local backend and the kernel's tests work without the runtime.

Two ways to be warm, chosen by what the runtime offers:
- snapshots + pool (`Image.build(warmup=...)`, `image.pool()`): the warmup starts the REPL in the
  bake VM with the warmup modules imported; the snapshot holds it running. A launch acquires a
  restored VM and attaches to that REPL (`vm.attach_process`), then says hello.
- cold boots only: the first launch boots a VM and spawns the REPL (critical path), and one spare
  VM with a fully warmed REPL is prepared in the background for the next launch (restart, death).

Release kills the REPL and gives the VM back (the pool restores it; a cold VM is destroyed).
A stuck guest (client.py `GuestRepl.reset`) uses the handle's bounded calls: `ping` the agent,
`kill_repl` (the REPL's process group), `destroy` (no call to the agent), and `respawn` starts a
fresh REPL in the same VM.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import signal
import threading
from typing import Any, Callable

from .attach import GUEST_DRIVER_PATH, REPL_ARGV, REPL_ID_FILE, attach_repl
from .backend import PREIMPORT_ENV, SpareKeeper, read_ready_frame, start_prestarted
from .guest_user import ROOT_USERS, effective_user, is_root, provision

log = logging.getLogger("supermachine_kernel.repl_client.vm")

# The agent signals the REPL with this (a real-time signal user code is unlikely to use) after
# every Hello, so a restored REPL starts warming up at once (guest/repl.py).
NOTIFY_HELLO_ENV = "SUPERMACHINE_NOTIFY_HELLO"
NOTIFY_HELLO_SIGNAL = 40  # SIGRTMIN + 6 on Linux
POOL_DEFER_SECONDS = 3.0  # after a kernel start that adopted its early VM (startup/sequence.py)


def _repl_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return dict(env, **{NOTIFY_HELLO_ENV: str(NOTIFY_HELLO_SIGNAL)}, **extra)



class EnvironmentNotBuilt(RuntimeError):
    """The kernel's image (with its packages) is not built yet; the message gives the command
    that builds it. Raised at once: a kernel start never pulls or installs."""


def describe_vm(vm: Any) -> str:
    """"microVM vm-3 (tcg)": how banners and logs name where the REPL runs."""
    accel = getattr(vm, "accel", None)
    return f"microVM {getattr(vm, 'id', '?')}" + (f" ({accel})" if accel else "")


def _api() -> Any:
    from .. import api  # noqa: PLC0415 - lazy on purpose: needs the compiled runtime

    return api


class VmHandle:
    prestarted = False
    greeted = False

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

    # -- a stuck guest (client.py GuestRepl.reset) ---------------------------------------------

    def ping(self, timeout: float) -> None:
        """One round trip to the VM's agent; TimeoutError if it takes longer than `timeout`."""
        self.vm.ping(timeout)

    def kill_repl(self, timeout: float) -> None:
        """SIGKILL to the REPL's process group (the agent signals the group: what the REPL
        forked dies with it, a fork bomb included), its exit seen, then every other process
        of the guest user (SWEEP: what left the group, e.g. with setsid), within about
        `timeout` seconds each; raises (TimeoutError, a VM error) otherwise. The VM stays."""
        self.vm.ping(timeout)
        _bounded(lambda: self.child.signal(signal.SIGKILL), timeout, "signalling the REPL")
        self.child.wait(timeout=timeout)
        try:
            _bounded(lambda: self.vm.exec(SWEEP, timeout_ms=int(timeout * 1000)), timeout,
                     "killing the guest user's other processes")
        except Exception as e:  # noqa: BLE001 - the REPL's own group is gone: go on
            log.warning("could not kill the guest user's other processes: %s", e)

    def destroy(self) -> None:
        """Destroys the VM without asking its agent anything (it may be frozen)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        discard = getattr(self.vm, "discard", None)
        (discard if discard is not None else self.vm.release)()

    def give_up_vm(self) -> Callable[[], None]:
        """This handle no longer releases the VM (a fresh REPL in it takes over: `respawn`);
        returns what releases it."""
        with self._lock:
            self._released = True
        return self._release


# Run as the guest user (no user named: the VM's default, the REPL's user): kill(-1, SIGKILL)
# ends every process that user may signal but the shell itself. For a root REPL that is every
# process but the agent (PID 1); what the kernel needs in the guest is started again with the
# fresh REPL (attach hooks).
SWEEP = ["/bin/sh", "-c", "kill -KILL -1"]


def _bounded(call: Callable[[], object], timeout: float, what: str) -> None:
    """`call()` on a daemon thread; TimeoutError when it has not returned within `timeout` s
    (a call to a frozen agent: the thread ends when the VM is destroyed)."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="guest-bounded-call", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"{what} took longer than {timeout:g} s")
    if failure:
        raise failure[0]


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
        packages: list[str] | None = None,
        requirements: str | None = None,
        build_hint: Callable[[], str] | None = None,
        guest_user: str = "",
    ) -> None:
        self.image_ref = image
        self.packages = list(packages or [])
        self.requirements = requirements or None
        #: Says how to build this configuration's image (asked only when it is not built).
        self.build_hint = build_hint
        #: Where the REPL starts and the environment it drops (the image's WorkingDir/User).
        self._repl_cwd: str | None = "/root"
        self._repl_drops: tuple[str, ...] = ()
        #: c.MicroVMKernel.guest_user, and what it means for this image (guest_user.py): the
        #: user the REPL runs as ("root" or a spec the guest is provisioned with) and the user
        #: its spawn names (None: the VM's default).
        self.guest_user = guest_user
        self._repl_user = "root"
        self._spawn_user: str | None = None
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.accelerator = accelerator
        self.warmup_imports = list(warmup_imports or [])
        self.use_pool = use_pool
        self._image: Any = None
        #: The guest's Python version once the image is known (before any VM answers).
        self.python_version: str | None = None
        #: True while Image.build runs with the warmup (a bake, when nothing is cached).
        self.baking = False
        self._pool: Any = None
        self._recipe: tuple[bytes, dict[str, str]] | None = None
        self._spares = SpareKeeper(self._start_spare, lambda h: h.vm.alive and h.child.poll() is None) \
            if pool_min > 0 else None
        self._lock = threading.Lock()
        #: A VM the kernel process began restoring before its imports (startup.sequence.EarlyVm):
        #: the first launch takes it if this configuration's warm snapshot is the one it holds.
        self.early: Any = None
        self._snapshots = False  # VMs come from the warm snapshot through the pool
        self._closed = False

    @property
    def image(self) -> Any:
        """The guest image (`api.Image`) once the first launch has resolved it, else None."""
        return self._image

    @property
    def snapshot_path(self) -> str | None:
        """The warm snapshot this backend's VMs are restored from (None: cold boots)."""
        return self._image.snapshot if self._image is not None and self._snapshots else None

    @property
    def pool(self) -> Any:
        """The VM pool (created now if its start was deferred); None without snapshots."""
        return self._ensure_pool() if self._snapshots else None

    def _ensure_pool(self) -> Any:
        with self._lock:
            if self._pool is None and self._snapshots and not self._closed:
                self._pool = self._image.pool(min=self.pool_min, max=self.pool_max)
            return self._pool

    def _ensure(self, driver: bytes, env: dict[str, str]) -> None:
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
            if self.packages:
                kwargs["packages"] = self.packages
            if self.requirements:
                kwargs["requirements"] = self.requirements
            params = inspect.signature(api.Image.build).parameters
            if "progress" in params:
                kwargs["progress"] = False
            if "cached_only" in params:
                kwargs["cached_only"] = True  # never pull or install here: see EnvironmentNotBuilt
            snapshots = self.use_pool and "warmup" in params and hasattr(api.Image, "pool")
            # The image first (a quick cache lookup): a missing one is reported at once, and the
            # guest's Python version is known, so kernel_info can answer while a first-ever
            # bake is still running.
            try:
                plain = api.Image.build(**kwargs, snapshot=False)
            except getattr(api, "ImageNotBuiltError", ()) as e:
                raise self._not_built(api, e) from None
            self.python_version = getattr(plain, "python_version", None)
            self._place_repl(plain)
            if snapshots:
                kwargs["warmup"] = self._warmup(driver, env)
                kwargs["warmup_tag"] = self._warmup_tag(driver, env)
                # Only slow when the snapshot is not cached yet; never from the host-wide store
                # (its snapshot is taken as it is, or the start fails).
                self.baking = not self._from_shared_store(api, plain)
            try:
                self._image = api.Image.build(**kwargs)
            except getattr(api, "ImageNotBuiltError", ()) as e:
                # Only from the host-wide store: a warm snapshot the admin has not baked.
                raise self._not_built(api, e) from None
            finally:
                self.baking = False
            if not is_root(self._repl_user):
                # Every process and file transfer of these VMs names no user: the guest's
                # default user (the provisioned one) applies, as after any restore.
                self._image.user = None
            elif self._spawn_user is not None:
                self._image.user = self._spawn_user  # root over an image's own User
            self.python_version = getattr(self._image, "python_version", None)
            if snapshots:
                self._snapshots = True
                self._spares = None  # the pool keeps restored VMs warm instead
                if self.early is None:
                    self._pool = self._image.pool(min=self.pool_min, max=self.pool_max)
                else:
                    # The first VM was restored at kernel start. Restoring the pool's spare now
                    # would compete for the CPU with that VM's warm-up and the first cell.
                    timer = threading.Timer(POOL_DEFER_SECONDS, self._ensure_pool)
                    timer.daemon = True
                    timer.start()

    @staticmethod
    def _from_shared_store(api: Any, image: Any) -> bool:
        shared = getattr(api, "shared_cache_dir", None)
        store = shared() if shared is not None else None
        return store is not None and str(image.rootfs).startswith(os.path.join(store, ""))

    def _not_built(self, api: Any, e: Exception) -> EnvironmentNotBuilt:
        shared = getattr(api, "shared_cache_dir", None)
        if shared is not None and shared() is not None:
            # The message names the admin's command (api.Image.build): users never build here.
            return EnvironmentNotBuilt(f"{e}.\nThen restart the kernel.")
        hint = self.build_hint() if self.build_hint is not None else None
        return EnvironmentNotBuilt(
            f"{e}.\nBuild it (and bake this kernel's warm snapshot) with:\n    "
            f"{hint or 'supermachine-kernel prepare'}\nthen restart the kernel.")

    # With the runtime's snapshots, the warmup starts the REPL itself (modules imported, slow
    # paths warmed) and the snapshot is taken with it running: every VM the pool restores
    # already has a warm REPL, which `launch` attaches to (attach.py).
    def _warmup(self, driver: bytes, env: dict[str, str]) -> Callable[[Any], None]:
        imports = ",".join(self.warmup_imports)

        def warmup(vm: Any) -> None:
            child = self._start_repl(vm, driver, dict(env, **{PREIMPORT_ENV: imports}),
                                     fresh=True)
            read_ready_frame(child, timeout=900)
            # Readable by the guest user: the agent reads files as that user (guest_user.py).
            vm.write_file(REPL_ID_FILE, json.dumps({"id": child.id}).encode(), mode=0o644)

        return warmup

    def _place_repl(self, image: Any) -> None:
        """The REPL runs in the image's WorkingDir as the guest user (guest_user.py; as root
        without a WorkingDir it starts in /root, as another user in its home: the agent's
        default for a user without a cwd). A non-root user keeps the HOME the agent gives it (its passwd
        entry's) instead of the guest environment's /root."""
        working_dir = getattr(image, "working_dir", None)
        image_user = getattr(image, "user", None)
        self._repl_user = effective_user(self.guest_user, image_user)
        root = is_root(self._repl_user)
        if root:
            self._spawn_user = None if image_user is None or image_user in ROOT_USERS else "0"
        else:
            self._spawn_user = self._repl_user
        self._repl_cwd = working_dir or ("/root" if root else None)
        self._repl_drops = () if root else ("HOME",)

    def _env(self, env: dict[str, str], **extra: str) -> dict[str, str]:
        return {k: v for k, v in _repl_env(env, **extra).items() if k not in self._repl_drops}

    def _warmup_tag(self, driver: bytes, env: dict[str, str]) -> str:
        h = hashlib.sha256(driver)
        h.update(json.dumps([sorted(env.items()), self.warmup_imports]).encode())
        h.update(f"guest-user:{self._repl_user}".encode())  # also makes pre-issue-16 bakes stale
        if self._repl_drops:
            h.update(json.dumps(self._repl_drops).encode())
        return "kernel-repl-" + h.hexdigest()[:16]

    @staticmethod
    def _attach_warm_repl(vm: Any) -> Any:
        """The REPL a restored VM already runs (attach.py), or None: then the caller spawns one
        (e.g. a pool without the warmup)."""
        try:
            return attach_repl(vm)
        except Exception:  # noqa: BLE001 - a fresh REPL is started instead
            log.warning("no warm REPL in the restored VM; starting one", exc_info=True)
            return None

    def _take_vm(self) -> tuple[Any, Callable[[], None]]:
        pool = self.pool
        if pool is not None:
            vm = pool.acquire()

            def give_back() -> None:
                # A dead VM is destroyed, not returned (the pool restores a fresh one anyway).
                if vm.alive:
                    vm.release()
                else:
                    vm.discard()

            return vm, give_back
        vm = self._image.boot()
        return vm, vm.release

    def _spawn(self, driver: bytes, env: dict[str, str]) -> VmHandle:
        vm, release = self._take_vm()
        prestarted = False
        try:
            child = self._attach_warm_repl(vm) if self._snapshots else None
            if child is not None:
                prestarted = True
            else:
                child = self._start_repl(vm, driver, env, fresh=not self._snapshots)
        except BaseException:
            release()
            raise
        handle = VmHandle(vm, child, release, describe_vm(vm))
        handle.prestarted = prestarted
        return handle

    def _start_repl(self, vm: Any, driver: bytes, env: dict[str, str],
                    fresh: bool = False) -> Any:
        """A fresh REPL process in `vm`; a `fresh` (cold-booted) VM gets its guest user set up
        first (guest_user.py), so the driver is the user's file, rewritable on a respawn."""
        if fresh and not is_root(self._repl_user):
            provision(vm, self._repl_user)
        vm.write_file(GUEST_DRIVER_PATH, driver, mode=0o644)
        return vm.spawn(REPL_ARGV, env=self._env(env), cwd=self._repl_cwd, user=self._spawn_user)

    def respawn(self, old: VmHandle, driver: bytes, env: dict[str, str]) -> VmHandle:
        """A fresh REPL in the VM of `old`, whose REPL was killed (`VmHandle.kill_repl`): files
        stay, variables are gone. The new handle releases the VM; on failure it is released."""
        release = old.give_up_vm()
        try:
            child = self._start_repl(old.vm, driver, env)
        except BaseException:
            release()
            raise
        return VmHandle(old.vm, child, release, old.describe())

    # Without the snapshot pool (use_pool=False), keep one VM with the REPL already started and
    # the warmup modules imported, so a restart (or a death) does not wait for a boot.
    def _start_spare(self) -> VmHandle:
        assert self._recipe is not None
        driver, env = self._recipe
        return start_prestarted(self._spawn, driver, env, self.warmup_imports, timeout=900)

    def launch(self, driver: bytes, env: dict[str, str]) -> VmHandle:
        self._ensure(driver, env)
        early, self.early = self.early, None
        if early is not None:
            taken = early.take(self.snapshot_path)
            if taken is not None:
                self._recipe = (driver, env)
                vm, child = taken
                handle = VmHandle(vm, child, vm.release, describe_vm(vm) + ", restored at kernel start")
                handle.prestarted = True
                handle.greeted = True  # startup.sequence.restore_and_attach said hello
                return handle
        spare = None
        if self._recipe != (driver, env):
            self._recipe = (driver, env)
        elif self._spares is not None:
            spare = self._spares.take()
        return spare or self._spawn(driver, env)

    def prepare_spare(self) -> None:
        if self._spares is not None and not self._snapshots and self._recipe is not None:
            self._spares.refill()

    def shrink(self) -> None:
        """Release the VMs kept ahead (the pool's warm VMs, a VM restored at kernel start and
        not taken): the kernel's guest is suspended while idle (machine/idle.py). The pool is
        made again when a VM is next needed; a VM on loan from it is destroyed when released."""
        early, self.early = self.early, None
        if early is not None:
            early.release()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("pool shutdown failed")

    def close(self) -> None:
        early, self.early = self.early, None
        if early is not None:
            early.release()
        if self._spares is not None:
            self._spares.close()
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("pool shutdown failed")
