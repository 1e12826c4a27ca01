"""The Python API: ``Image`` → ``Vm`` → ``ExecChild``, in the shape of the seed's
``@supermachine/core`` (DESIGN.md §2).

    from supermachine_kernel.api import Image

    image = Image.build()                 # the default guest image (built once, cached)
    with image.boot() as vm:              # a fresh microVM
        r = vm.exec(["python3", "-c", "print(1 + 1)"])
        assert r.stdout == b"2\\n"

    pool = image.pool(min=1, max=4)
    vm = pool.acquire()                   # a Vm, on loan: release() gives it back
    vm.exec(["true"])
    vm.release()

Everything that blocks releases the GIL. Errors are typed (see the exception classes below);
their messages say what to do next.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from . import _core
from ._core import (
    AcceleratorError,
    ExecChild,
    ExecResult,
    ExitStatus,
    GuestError,
    ImageNotBuiltError,
    ImageNotFoundError,
    PoolError,
    ProtocolError,
    QemuNotFoundError,
    SnapshotError,
    VmDiedError,
    VmError,
    VmReleasedError,
    prefetch_snapshot_memory,
    remove_work_dirs_at_exit,
    snapshot_files_stamp,
    snapshot_info,
)
from .expose import MAX_CONNECTIONS, Exposure, Slots

ImageError = _core.ImageError

__all__ = [
    "Image",
    "Pool",
    "Vm",
    "Exposure",
    "ExecChild",
    "ExecResult",
    "ExitStatus",
    "VmError",
    "VmDiedError",
    "VmReleasedError",
    "ProtocolError",
    "GuestError",
    "AcceleratorError",
    "QemuNotFoundError",
    "ImageNotFoundError",
    "ImageError",
    "ImageNotBuiltError",
    "SnapshotError",
    "PoolError",
    "shared_cache_dir",
    "snapshot_info",
    "snapshot_files_stamp",
    "prefetch_snapshot_memory",
    "remove_work_dirs_at_exit",
]

# Registered at import, so it runs after the exit functions of whatever used this module (they
# run last-registered first): VMs still held then (a release cut off, a restore in flight on
# another thread) die with the process, and this removes their work dirs.
atexit.register(remove_work_dirs_at_exit)

PathLike = Union[str, "os.PathLike[str]"]
FileData = Union[bytes, bytearray, memoryview, str]
Tty = Union[bool, "tuple[int, int]", None]

_vm_ids = itertools.count(1)


def _config_env(entries: Iterable[str]) -> dict:
    """An OCI image config's ``Env`` (``KEY=value`` entries) as a dict."""
    return dict(e.split("=", 1) for e in entries if "=" in e)


def _merge_env(base: Mapping[str, str], extra: Optional[Mapping[str, str]]) -> Optional[dict]:
    if not base and not extra:
        return None
    env = dict(base)
    env.update(extra or {})
    return env


def _file_bytes(data: Union[FileData, "os.PathLike[str]"]) -> bytes:
    if isinstance(data, os.PathLike):
        with open(data, "rb") as f:
            return f.read()
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


def _default_snapshots_dir() -> str:
    return os.path.join(_core.image_cache_dir(None), "snapshots")


#: Names the host-wide image store: images and warm snapshots an administrator built for every
#: user of the host (readable by all, written by the admin only).
SHARED_CACHE_ENV = "SUPERMACHINE_SHARED_CACHE_DIR"
#: The host-wide store when SHARED_CACHE_ENV is unset (used if it exists).
DEFAULT_SHARED_CACHE_DIR = "/var/cache/supermachine-kernel"


def shared_cache_dir() -> Optional[str]:
    """The host-wide image store: ``$SUPERMACHINE_SHARED_CACHE_DIR``, else
    /var/cache/supermachine-kernel if it exists; None when there is none or it is this user's
    own cache. A kernel whose image is not in the user's cache restores from there."""
    shared = os.environ.get(SHARED_CACHE_ENV, "").strip()
    if not shared:
        shared = DEFAULT_SHARED_CACHE_DIR
    if not os.path.isdir(shared):
        return None
    if os.path.realpath(shared) == os.path.realpath(_core.image_cache_dir(None)):
        return None
    return shared


def _shared_prepare_hint() -> str:
    return "sudo supermachine-kernel prepare --shared"


def _mark_used(snapshot: str) -> None:
    """Stamps a warm snapshot as used now (its `last-used` file's mtime): `image prune` and the
    cache budget evict the least recently used first. Best effort (a read-only cache)."""
    stamp = os.path.join(snapshot, "last-used")
    try:
        with open(stamp, "a"):
            pass
        os.utime(stamp)
    except OSError:
        pass


def _warmup_identity(warmup: Callable[..., Any]) -> str:
    """A stable tag for a warmup callable given without warmup_tag: its name and bytecode."""
    code = getattr(warmup, "__code__", None)
    h = hashlib.sha256(f"{getattr(warmup, '__module__', '')}.{getattr(warmup, '__qualname__', '')}".encode())
    if code is not None:
        h.update(code.co_code)
        h.update(repr(code.co_consts).encode())
    return "callable-" + h.hexdigest()[:16]


def _snapshot_key(paths: Mapping[str, Any], memory_mib: int, vcpus: int, env: Mapping[str, str],
                  files: Mapping[str, bytes], warmup_tag: Optional[str]) -> str:
    def ident(p: Optional[str]) -> Optional[list]:
        if not p:
            return None
        st = os.stat(p)
        return [p, st.st_size, st.st_mtime_ns]

    material = {
        "image": [paths["name"], paths["hash"]],
        "files": [ident(paths["kernel"]), ident(paths.get("initrd")), ident(paths["rootfs"])],
        "memory_mib": memory_mib,
        "vcpus": vcpus,
        "env": sorted(env.items()),
        "extra_files": sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()),
        "warmup_tag": warmup_tag,
        "accel": _core.detect_accel(),
        "qemu": ident(os.fspath(_core.find_qemu())),  # an upgraded QEMU cannot restore old state
        "protocol": _core.PROTOCOL_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


class Image:
    """A bootable guest — kernel, initramfs, root image, VM shape (memory, vcpus), environment
    and extra files — and, once baked, the snapshot every VM of it is restored from.

    ``Image.build(...)`` finds or builds the guest image, then bakes a snapshot (cold boot,
    extra files, ``warmup(vm)``, snapshot) cached under ``snapshots_dir``; ``image.boot()`` and
    ``image.pool()`` restore VMs from it in tens of milliseconds instead of seconds.
    """

    def __init__(
        self,
        *,
        name: str,
        hash: str,
        kernel: str,
        initrd: Optional[str],
        rootfs: str,
        python_version: Optional[str] = None,
        memory_mib: int = 256,
        vcpus: int = 1,
        env: Optional[Mapping[str, str]] = None,
        extra_files: Optional[Mapping[str, bytes]] = None,
        boot_timeout: float = 60.0,
        snapshot: Optional[str] = None,
        working_dir: Optional[str] = None,
        user: Optional[str] = None,
    ) -> None:
        self.name = name
        self.hash = hash
        self.kernel = kernel
        self.initrd = initrd
        self.rootfs = rootfs
        self.python_version = python_version
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.env: dict = dict(env or {})
        self.extra_files: dict = dict(extra_files or {})
        self.boot_timeout = boot_timeout
        #: The image config's WorkingDir and User (OCI images): the default cwd and user of
        #: every process its VMs start (None: the agent's, i.e. / and root).
        self.working_dir = working_dir or None
        self.user = user or None
        #: Path of the snapshot VMs are restored from (None: every boot is a cold boot).
        self.snapshot = snapshot
        # The VM that baked the snapshot, handed to the first boot()/acquire().
        # The box (not `self`) is what the finalizer holds, so an unused seed dies with the Image.
        self._seed_box: list = [None]
        self._seed_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, Image._release_seed_box, self._seed_box)

    @staticmethod
    def _release_seed_box(box: list) -> None:
        vm = box[0]
        box[0] = None
        if vm is not None:
            vm.release()

    def _set_seed(self, vm: Optional["Vm"]) -> None:
        with self._seed_lock:
            self._seed_box[0] = vm

    def _take_seed(self) -> Optional["Vm"]:
        with self._seed_lock:
            vm, self._seed_box[0] = self._seed_box[0], None
        if vm is not None and not vm.alive:
            vm.release()
            return None
        return vm

    def __repr__(self) -> str:
        snap = f" snapshot={self.snapshot!r}" if self.snapshot else ""
        return f"<Image {self.name} ({self.hash}) {self.memory_mib} MiB x{self.vcpus}{snap}>"

    @classmethod
    def build(
        cls,
        ref: Optional[str] = None,
        name: Optional[str] = None,
        memory_mib: int = 256,
        vcpus: int = 1,
        env: Optional[Mapping[str, str]] = None,
        extra_files: Optional[Mapping[str, Union[FileData, "os.PathLike[str]"]]] = None,
        warmup: Optional[Callable[["Vm"], Any]] = None,
        warmup_tag: Optional[str] = None,
        snapshots_dir: Optional[PathLike] = None,
        cache_dir: Optional[PathLike] = None,
        progress: bool = True,
        boot_timeout: float = 60.0,
        snapshot: bool = True,
        packages: Optional[Sequence[str]] = None,
        requirements: Optional[PathLike] = None,
        kernel_layer: Optional[bool] = None,
        cached_only: bool = False,
    ) -> "Image":
        """Finds (or builds, on first use) guest image ``ref`` (None = the default image) and
        bakes its snapshot: a cold boot, ``extra_files`` (guest path → bytes, str or a host
        path) written, ``warmup(vm)`` run (e.g. imports), then a snapshot. Snapshots are cached
        under ``snapshots_dir`` keyed by image, memory, vcpus, env, extra files' contents and
        ``warmup_tag``: the next build returns at once. ``env`` is added to every process's
        environment. ``snapshot=False`` skips baking: every boot is then a cold boot.

        For an OCI image (``ref="python:3.12-slim"``), the guest's Python is detected from its
        files and a cached *kernel layer* (IPython, comm, matplotlib-inline, ipywidgets for
        that Python and libc) is stacked on it; ``kernel_layer=False`` leaves it out (the image
        then needs no python3). ``packages`` (e.g. ``["scikit-learn==1.6.1"]``) and
        ``requirements`` (a requirements file) are installed by the host's pip into another
        cached layer keyed by the resolved set. Versions the image already has are kept. The
        image config's ``Env`` is the default of ``env`` (``env`` wins per variable); its
        ``WorkingDir`` and ``User`` are the default ``cwd`` and ``user`` of the VMs' processes.

        ``cached_only=True`` never pulls, resolves or builds: it returns the image already built
        for this request or raises ``ImageNotBuiltError`` at once (a kernel start uses it)."""
        if memory_mib < 64:
            raise ValueError(f"memory_mib must be at least 64 (got {memory_mib})")
        if vcpus < 1:
            raise ValueError(f"vcpus must be at least 1 (got {vcpus})")
        if isinstance(packages, str):
            raise TypeError("packages must be a list of requirement strings, not one string")
        def ensure(root: Optional[PathLike], only_cached: bool) -> dict:
            return _core.ensure_image(
                ref, name, None if root is None else os.fspath(root), None, progress,
                kernel_layer=kernel_layer,
                packages=None if packages is None else [str(p) for p in packages],
                requirements=None if requirements is None else os.fspath(requirements),
                cached_only=only_cached,
            )

        # A kernel start (cached_only) that finds nothing in the user's own cache looks in the
        # host-wide store the admin filled; it restores that store's warm snapshot in place.
        shared = shared_cache_dir() if cached_only and cache_dir is None and snapshots_dir is None \
            else None
        try:
            paths = ensure(cache_dir, cached_only)
            shared = None
        except ImageNotBuiltError:
            if shared is None:
                raise
            try:
                paths = ensure(shared, True)
            except ImageNotBuiltError as e:
                raise ImageNotBuiltError(
                    f"{e}; not in this user's cache nor in the host-wide store {shared} either. "
                    f"The administrator builds it there with `{_shared_prepare_hint()}`") from None
            except ImageError as e:
                # E.g. this installation's guest agent has no initramfs there (an upgrade since
                # the store was prepared): a user may not add one.
                raise ImageNotBuiltError(
                    f"the host-wide store {shared} does not fit this installation ({e}). The "
                    f"administrator updates it with `{_shared_prepare_hint()}`") from None
        oci = paths.get("oci") or {}
        env = {**_config_env(oci.get("env") or ()), **dict(env or {})}
        files = {str(k): _file_bytes(v) for k, v in (extra_files or {}).items()}
        image = cls(
            name=paths["name"],
            hash=paths["hash"],
            kernel=paths["kernel"],
            initrd=paths.get("initrd"),
            rootfs=paths["rootfs"],
            python_version=paths.get("python_version"),
            memory_mib=memory_mib,
            vcpus=vcpus,
            env=env,
            extra_files=files,
            boot_timeout=boot_timeout,
            working_dir=oci.get("working_dir"),
            user=oci.get("user"),
        )
        if not snapshot:
            return image
        if warmup is not None and warmup_tag is None:
            warmup_tag = _warmup_identity(warmup)
        key = _snapshot_key(paths, memory_mib, vcpus, image.env, files, warmup_tag)
        if shared is not None:
            root = os.path.join(shared, "snapshots")
        else:
            root = os.fspath(snapshots_dir) if snapshots_dir is not None else _default_snapshots_dir()
        dest = os.path.join(root, f"{image.name}-{memory_mib}m-{vcpus}c-{key}")
        if shared is not None:
            return image._adopt_shared_snapshot(dest)
        if os.path.isdir(dest):
            try:
                # check_host: a snapshot baked before a QEMU upgrade (or a change of the command
                # line) is baked again rather than handed out to fail at every restore.
                _core.snapshot_info(dest, check_host=True)
                image.snapshot = dest
                _mark_used(dest)
                return image
            except (SnapshotError, OSError) as e:
                if progress:
                    print(f"supermachine: discarding unusable snapshot {dest}: {e}", file=sys.stderr)
                shutil.rmtree(dest, ignore_errors=True)
        image._bake(dest, warmup, warmup_tag, progress)
        _mark_used(dest)
        if snapshots_dir is None and os.environ.get("SUPERMACHINE_CACHE_BUDGET", "").strip():
            # Imported here for speed: images.py costs ~8 ms, and kernels import this module.
            from .images import apply_budget  # noqa: PLC0415

            apply_budget(cache_dir, protect=[dest])  # not the snapshot just baked
        return image

    def _adopt_shared_snapshot(self, dest: str) -> "Image":
        """Takes the host-wide store's warm snapshot `dest` (restored in place, never copied)
        or fails at once: users never bake into that store, and a bake of their own would take
        minutes on their first kernel start."""
        try:
            _core.snapshot_info(dest, check_host=True)
        except (SnapshotError, OSError) as e:
            raise ImageNotBuiltError(
                f"image {self.name} is in the host-wide store, but this kernel's warm snapshot "
                f"({self.memory_mib} MiB, {self.vcpus} vCPU) is not usable there: {e}. The "
                f"administrator bakes it with `{_shared_prepare_hint()}` (the same kernelspec "
                f"and Jupyter configuration as this kernel's)") from None
        self.snapshot = dest
        return self

    def _bake(self, dest: str, warmup: Optional[Callable[["Vm"], Any]], warmup_tag: Optional[str],
              progress: bool) -> None:
        t = time.monotonic()
        if progress:
            print(f"supermachine: baking snapshot of {self.name} ({self.memory_mib} MiB, "
                  f"{self.vcpus} vCPU) …", file=sys.stderr, flush=True)
        vm = self.cold_boot()
        try:
            if warmup is not None:
                warmup(vm)
            labels = {"image": self.name, "image_hash": self.hash}
            if warmup_tag:
                labels["warmup_tag"] = warmup_tag
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                vm._vm.snapshot(dest, labels)
            except SnapshotError:
                if not os.path.isdir(dest):  # a concurrent baker may have won the race
                    raise
        except BaseException:
            vm.release()
            raise
        self.snapshot = dest
        self._set_seed(vm)
        if progress:
            print(f"supermachine: snapshot ready in {time.monotonic() - t:.1f} s: {dest}",
                  file=sys.stderr, flush=True)

    @classmethod
    def from_snapshot(cls, path: PathLike, env: Optional[Mapping[str, str]] = None) -> "Image":
        """An Image whose VMs are restored from the snapshot at ``path``. Its files are verified
        now (a corrupt or incomplete snapshot raises SnapshotError); one taken with another QEMU,
        accelerator, image or command line is refused with SnapshotError when booted."""
        meta = _core.snapshot_info(os.fspath(path))
        labels = meta.get("labels") or {}
        machine = meta["machine"]
        return cls(
            name=labels.get("image", "snapshot"),
            hash=labels.get("image_hash", ""),
            kernel=meta["kernel"],
            initrd=meta["initrd"] or None,
            rootfs=meta["rootfs"],
            memory_mib=machine["memory_mib"],
            vcpus=machine["vcpus"],
            env=env,
            snapshot=meta["path"],
        )

    def boot(self) -> "Vm":
        """A fresh VM: restored from the snapshot when there is one (the first call gets the
        VM that baked it), else cold-booted."""
        if self.snapshot is None:
            return self.cold_boot()
        seed = self._take_seed()
        if seed is not None:
            return seed
        return Vm(_core.Vm.restore(self.snapshot, timeout=self.boot_timeout), env=self.env,
                  cwd=self.working_dir, user=self.user)

    def cold_boot(self) -> "Vm":
        """Boots a VM from scratch (seconds under TCG) and writes the extra files."""
        raw = _core.Vm.boot(
            self.kernel,
            self.initrd,
            self.rootfs,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            boot_timeout=self.boot_timeout,
        )
        vm = Vm(raw, env=self.env, cwd=self.working_dir, user=self.user)
        try:
            for path, data in self.extra_files.items():
                vm.write_file(path, data)
        except BaseException:
            vm.release()
            raise
        return vm

    def pool(
        self,
        min: int = 1,
        max: int = 4,
        acquire_timeout_ms: int = 0,
        idle_timeout_ms: Optional[int] = None,
        restore_on_release: bool = True,
    ) -> "Pool":
        """A thread-safe pool of VMs restored from this image's snapshot. ``acquire()`` is
        FIFO-fair when saturated (``acquire_timeout_ms=0`` waits forever); with
        ``restore_on_release`` a VM given back by ``vm.release()`` is replaced by a fresh
        restore, so nothing one user wrote is visible to the next; without it the same VM is
        handed out again as it was left. The VM that baked the snapshot is handed out first."""
        if self.snapshot is None:
            raise ValueError("this image has no snapshot: build it with Image.build(snapshot=True)")
        seed = self._take_seed()
        raw = _core.Pool(
            self.snapshot,
            min=min,
            max=max,
            acquire_timeout_ms=acquire_timeout_ms,
            idle_timeout_ms=idle_timeout_ms,
            restore_on_release=restore_on_release,
            seed=[seed._vm] if seed is not None else None,
            restore_timeout=self.boot_timeout,
        )
        return Pool(raw, env=self.env, cwd=self.working_dir, user=self.user)


class Pool:
    """VMs restored from one snapshot; see ``Image.pool``.

        vm = pool.acquire()        # waits while all are in use
        vm.exec([...])
        vm.release()               # back to the pool (or ``with pool.acquire() as vm: ...``)
    """

    def __init__(self, raw: "_core.Pool", env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, user: Optional[str] = None) -> None:
        self._pool = raw
        self._env = dict(env or {})
        self._cwd = cwd
        self._user = user
        self._finalizer = weakref.finalize(self, raw.shutdown)

    def acquire(self) -> "Vm":
        """Takes a VM (waiting in FIFO order while all are in use) and returns it. Give it
        back with ``vm.release()`` (or use it as a context manager: ``with pool.acquire() as
        vm: ...``); ``vm.discard()`` destroys it instead. A VM never given back keeps its
        place in the pool. Raises TimeoutError after ``acquire_timeout_ms``, PoolError once
        the pool is shut down."""
        return Vm(self._pool.acquire(), env=self._env, pool=self, cwd=self._cwd, user=self._user)

    def stats(self) -> dict:
        """alive, in_use, idle, waiting, min, max (plus creating and recent latencies)."""
        return self._pool.stats()

    def shutdown(self) -> None:
        """Releases idle VMs and refuses further acquires. VMs acquired before keep working
        until they are released; then they are destroyed instead of returned."""
        self._pool.shutdown()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _GivenBack:
    """Stands in for a pooled VM's runtime handle once ``release()`` or ``discard()`` let go of
    the VM: the pool may already have handed it to someone else, so this handle must never
    reach it again. It still answers the facts fixed at restore (accel, boot_id,
    restored_from), like a released VM does."""

    alive = False
    qemu_pid = None
    workdir = None

    def __init__(self, vm_id: str, how: str, raw: "_core.Vm") -> None:
        self.how = how
        self.accel = raw.accel
        self.boot_id = raw.boot_id
        self.restored_from = raw.restored_from
        done = ("given back to its pool by release()" if how == "released"
                else "destroyed by discard()")
        self._message = f"{vm_id} was {done}; take another VM with pool.acquire()"

    def __getattr__(self, name: str) -> Any:
        raise VmReleasedError(self._message)


class Vm:
    """A running microVM, from ``image.boot()`` or on loan from ``pool.acquire()``. Use it as
    a context manager, or call ``release()`` when done: that kills a booted VM and gives a
    pooled one back to its pool."""

    def __init__(self, raw: "_core.Vm", env: Optional[Mapping[str, str]] = None, *,
                 pool: Optional[Pool] = None, cwd: Optional[str] = None,
                 user: Optional[str] = None) -> None:
        self._vm: Any = raw
        self._env = dict(env or {})
        #: Defaults of exec/spawn's cwd and user (the image config's WorkingDir and User).
        self._cwd = cwd
        self._user = user
        self._pool = pool
        self._give_back_lock = threading.Lock()
        self.id = f"vm-{next(_vm_ids)}"
        self._exposures: list[Exposure] = []
        self._expose_slots = Slots(MAX_CONNECTIONS)

    @classmethod
    def attach_unix(cls, path: PathLike, timeout: float = 10.0) -> "Vm":
        """Connects to an agent serving on a unix socket (``supermachine-agent --listen-unix
        PATH``), without QEMU. For tests."""
        return cls(_core.Vm.attach_unix(os.fspath(path), timeout))

    # ---- processes ----

    def exec(
        self,
        argv: Sequence[str],
        stage_files: Optional[Mapping[str, FileData]] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        tty: Tty = False,
        stdin: Optional[FileData] = None,
        user: Optional[str] = None,
    ) -> ExecResult:
        """Runs ``argv`` to completion; returns stdout, stderr, exit_code, timed_out,
        peak_rss_kib. ``stage_files`` (guest path → data) are written first; ``stdin`` is fed
        and then closed (without it, stdin is closed at once). A process that outlives
        ``timeout_ms`` is killed: exit_code -1, timed_out True. ``cwd`` and ``user``
        (``uid[:gid]`` or ``name[:group]``) default to the image config's WorkingDir and User."""
        return self._vm.exec(
            list(argv),
            stage_files=dict(stage_files) if stage_files else None,
            env=_merge_env(self._env, env),
            cwd=cwd if cwd is not None else self._cwd,
            timeout_ms=timeout_ms,
            tty=tty,
            stdin=stdin,
            user=user if user is not None else self._user,
        )

    def spawn(
        self,
        argv: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        tty: Tty = False,
        user: Optional[str] = None,
    ) -> ExecChild:
        """Starts ``argv`` and returns its handle: write_stdin, close_stdin, read_stdout,
        read_stderr, signal, resize, wait, poll. ``cwd`` and ``user`` default as in ``exec``."""
        return self._vm.spawn(
            list(argv), env=_merge_env(self._env, env),
            cwd=cwd if cwd is not None else self._cwd, timeout_ms=timeout_ms, tty=tty,
            user=user if user is not None else self._user,
        )

    def attach_process(self, id: int) -> ExecChild:
        """A handle to a guest process that already exists (e.g. after a restore)."""
        return self._vm.attach_process(id)

    def processes(self) -> list:
        """The guest agent's process table (dicts: id, os_pid, argv, running, tty)."""
        return self._vm.processes()

    # ---- files ----

    def write_file(self, path: str, data: FileData, mode: int = 0o644) -> None:
        """Writes guest file ``path`` (streamed in chunks). For a host file use ``upload``."""
        if isinstance(data, os.PathLike):
            raise TypeError("write_file takes bytes or str; use upload(host_path, guest_path) for a host file")
        self._vm.write_file(path, data, mode)

    def read_file(self, path: str, *, max_bytes: Optional[int] = None,
                  follow_symlinks: bool = True, timeout: Optional[float] = None) -> bytes:
        """Reads a whole guest file (``max_bytes``, ``follow_symlinks``, ``timeout`` as in
        ``download``)."""
        return self._vm.read_file(path, max_bytes, follow_symlinks, timeout)

    def upload(self, host_path: PathLike, guest_path: str, mode: Optional[int] = None) -> int:
        """Copies a host file into the guest (streamed); mode defaults to the host file's."""
        return self._vm.upload(os.fspath(host_path), guest_path, mode)

    def download(self, guest_path: str, host_path: Union[PathLike, int], *,
                 max_bytes: Optional[int] = None, follow_symlinks: bool = True,
                 timeout: Optional[float] = None) -> int:
        """Copies a guest file to the host (streamed); returns its size. ``host_path``: a path
        (the file appears atomically) or an open file descriptor (written from its offset,
        left open). For files a guest program may have swapped, pass ``max_bytes`` and/or
        ``follow_symlinks=False``: the read then takes regular files only (a FIFO, device or
        socket is a GuestError, never a hang), refuses a final symlink unless followed, and a
        file past ``max_bytes`` is a GuestError of kind "limit" with at most ``max_bytes``
        bytes written. Needs "read_limits" in ``agent_features`` (VMs restored from
        snapshots baked before it raise ValueError: re-bake with ``supermachine-kernel
        prepare``). Past ``timeout`` seconds the read is abandoned (TimeoutError)."""
        if isinstance(host_path, int):
            return self._vm.download_fd(guest_path, host_path, max_bytes, follow_symlinks,
                                        timeout)
        return self._vm.download(guest_path, os.fspath(host_path), max_bytes, follow_symlinks,
                                 timeout)

    @property
    def agent_features(self) -> list[str]:
        """What this VM's guest agent understands beyond the base protocol (e.g.
        "read_limits"); empty for agents in snapshots baked before the list existed."""
        return self._vm.agent_features

    # ---- exposed ports ----

    def expose_tcp(self, guest_port: int, host_port: int = 0) -> Exposure:
        """Makes guest TCP port ``guest_port`` (on the guest's 127.0.0.1) reachable on the
        host at 127.0.0.1:``host_port`` (0: any free port). Returns an Exposure: ``.host_port``,
        ``.url``, ``.stop()`` (closes the listener; connections in flight go on until either
        side closes). Each host connection is relayed through the agent channel (see
        supermachine_kernel/expose.py); at most 32 at once per VM. Exposures belong to this
        handle: ``release()``/``discard()`` close them and their connections, and a VM restored
        from a snapshot of this one has none (expose again)."""
        x = Exposure(lambda: self, guest_port, host_port, slots=self._expose_slots,
                     on_close=self._forget_exposure)
        with self._give_back_lock:
            self._exposures.append(x)
        return x

    @property
    def exposures(self) -> list:
        """This handle's exposures that are still listening."""
        with self._give_back_lock:
            return list(self._exposures)

    def _forget_exposure(self, x: Exposure) -> None:
        with self._give_back_lock:
            if x in self._exposures:
                self._exposures.remove(x)

    def _close_exposures(self) -> None:
        for x in self.exposures:
            x.close()

    # ---- guest -> host ----

    def forward_to_host(self, guest_port: int, host_port: int) -> None:
        """The guest agent listens on 127.0.0.1:``guest_port`` inside the guest; every
        connection accepted there is connected on the host to 127.0.0.1:``host_port`` (always
        the host's loopback: the guest never chooses the host destination) and relayed both
        ways with back-pressure. Idempotent: call it again after a restore, reconnect or pool
        hand-out (a snapshot's agent may listen already) to re-attach. A connection the agent
        accepts while no host side is attached is closed; at most 64 guest connections at
        once per VM (more are closed, with a log line). Raises ValueError if the agent of this
        VM's image or snapshot predates TCP channels (rebuild it)."""
        self._vm.forward_to_host(guest_port, host_port)

    def stop_forward(self, guest_port: int) -> None:
        """Stops listening on ``guest_port`` in the guest; connections in flight go on."""
        self._vm.stop_forward(guest_port)

    def tcp_relay(self, guest_port: int, sock: socket.socket, half_closed_idle: float = 120.0) -> Any:
        """Connects to 127.0.0.1:``guest_port`` in the guest through the agent's TCP channel
        and relays it with the connected host socket ``sock`` (the relay holds a duplicate of
        it) in two runtime threads. Returns a ``_core.TcpRelay``: ``wait(timeout)``, ``close()``,
        ``done``, ``bytes``. Raises GuestError (kind not_found) if nothing listens there. Used by
        exposed ports (expose.py); needs ``tcp_channels``."""
        return self._vm.tcp_relay(guest_port, sock.fileno(), half_closed_idle=half_closed_idle)

    @property
    def tcp_channels(self) -> bool:
        """Whether this VM's agent speaks native TCP channels (``forward_to_host``, and
        exposed ports without a guest relay process)."""
        return "tcp" in self._vm.agent_features

    # ---- snapshots ----

    def snapshot(self, dest: PathLike) -> Image:
        """Snapshots this running VM into the new directory ``dest`` and returns an Image that
        restores it; this VM runs on. Processes (e.g. a REPL holding variables) survive into
        every restore and are re-attached with ``attach_process(id)``. Output a process wrote
        before the snapshot and this VM's handles had not read yet is not in the snapshot."""
        self._vm.snapshot(os.fspath(dest), {"taken_from": self.id})
        return Image.from_snapshot(dest, env=self._env)

    def snapshot_incremental(self, dest: PathLike) -> Image:
        """Like ``snapshot``, but keeps only the guest RAM pages that differ from the snapshot
        this VM was restored from (its base, named in the new snapshot's metadata): a fraction
        of the size. Restoring it needs the base in place, unchanged; a base gone or changed is
        refused with SnapshotError naming it. Raises SnapshotError, this VM running on, when
        there is no usable base (a cold-booted VM, a base replaced since the restore)."""
        self._vm.snapshot_incremental(os.fspath(dest), {"taken_from": self.id})
        return Image.from_snapshot(dest, env=self._env)

    def pause(self) -> None:
        """Freezes the guest: the agent goes quiet and QEMU stops the vCPUs, so nothing in the
        VM runs and it costs no CPU until ``resume()``."""
        self._vm.pause()

    def resume(self, timeout: float = 30.0) -> int:
        """Continues a paused guest over a new agent channel. As after a restore, the guest
        clock is set to the host's, its RNG reseeded and its generation bumped (the REPL
        reseeds Python's ``random``). Returns the new generation."""
        return self._vm.resume(timeout)

    def reconnect(self, timeout: float = 30.0) -> int:
        """Drops the channel to the guest agent and opens a new one. Processes, their unread
        output and every ExecChild handle survive; calls in flight fail. Returns the guest's
        generation (how many Hellos it has seen)."""
        return self._vm.reconnect(timeout)

    @property
    def restored_from(self) -> Optional[str]:
        """The snapshot this VM was restored from (None for a cold boot)."""
        return self._vm.restored_from

    # ---- lifecycle ----

    def ping(self, timeout: Optional[float] = None) -> None:
        """One round trip to the guest agent."""
        self._vm.ping(timeout)

    @property
    def alive(self) -> bool:
        """True until the VM died or was released."""
        return self._vm.alive

    @property
    def qemu_pid(self) -> Optional[int]:
        return self._vm.qemu_pid

    @property
    def accel(self) -> Optional[str]:
        """"kvm" or "tcg"."""
        return self._vm.accel

    @property
    def boot_id(self) -> str:
        return self._vm.boot_id

    def console_tail(self, max_bytes: int = 65536) -> Optional[str]:
        """The last lines of the guest's serial console (the host keeps its last 64 KiB in
        memory, whatever the guest writes); None without a QEMU."""
        return self._vm.console_tail(max_bytes)

    def console_sizes(self) -> Optional[tuple[int, int]]:
        """(bytes the guest wrote to its serial console in all, bytes the host keeps)."""
        return self._vm.console_sizes()

    @property
    def workdir(self) -> Optional[str]:
        w = self._vm.workdir
        return None if w is None else os.fspath(w)

    @property
    def pool(self) -> Optional[Pool]:
        """The Pool this VM is on loan from (None for a VM from ``boot()``)."""
        return self._pool

    def release(self) -> None:
        """Done with this VM. A VM from ``pool.acquire()`` goes back to its pool: with
        ``restore_on_release`` (the default) the pool destroys it and restores a fresh one in
        the background, else it is handed out again as it is; if the pool was shut down it is
        destroyed. Any other VM is killed and its work dir removed. Afterwards every call on
        this handle raises VmReleasedError. Idempotent."""
        self._close_exposures()
        if self._pool is None:
            self._vm.release()
        else:
            self._give_back(discard=False)

    def discard(self) -> None:
        """Destroys a pooled VM instead of giving it back (it broke, or it holds something
        the next user must not see, in a pool without ``restore_on_release``); the pool
        restores a replacement when it needs one. For a VM not from a pool this is
        ``release()``. A no-op after ``discard()``; after ``release()`` the VM may already be
        someone else's, so that raises VmReleasedError."""
        if self._pool is None:
            self._vm.release()
        else:
            self._give_back(discard=True)

    def _give_back(self, discard: bool) -> None:
        assert self._pool is not None
        with self._give_back_lock:
            raw = self._vm
            if isinstance(raw, _GivenBack):
                if discard and raw.how == "released":
                    raise VmReleasedError(
                        f"{self.id} was already given back to its pool by release(), so it can "
                        "no longer be discarded: call discard() instead of release(), not after it"
                    )
                return
            self._vm = _GivenBack(self.id, "discarded" if discard else "released", raw)
        if discard:
            self._pool._pool.discard(raw)
        else:
            self._pool._pool.release(raw)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "released"
        pooled = " pooled" if self._pool is not None else ""
        return f"<Vm {self.id}{pooled} {state} qemu_pid={self.qemu_pid}>"


def __getattr__(name: str) -> Any:
    if name == "Lease":
        warnings.warn(
            "supermachine_kernel.api.Lease is deprecated: pool.acquire() returns the Vm itself "
            "(vm.exec(...), then vm.release() gives it back, vm.discard() destroys it); "
            "Lease is now an alias of Vm",
            DeprecationWarning,
            stacklevel=2,
        )
        return Vm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
