"""The Python API: ``Image`` → ``Vm`` → ``ExecChild``, in the shape of the seed's
``@supermachine/core`` (DESIGN.md §2).

    from supermachine_kernel.api import Image

    image = Image.build()                 # the default guest image (built once, cached)
    with image.boot() as vm:              # a fresh microVM
        r = vm.exec(["python3", "-c", "print(1 + 1)"])
        assert r.stdout == b"2\\n"

Everything that blocks releases the GIL. Errors are typed (see the exception classes below);
their messages say what to do next.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from . import _core
from ._core import (
    AcceleratorError,
    ExecChild,
    ExecResult,
    ExitStatus,
    GuestError,
    ImageNotFoundError,
    ProtocolError,
    QemuNotFoundError,
    VmDiedError,
    VmError,
    VmReleasedError,
)

ImageError = _core.ImageError

__all__ = [
    "Image",
    "Vm",
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
]

PathLike = Union[str, "os.PathLike[str]"]
FileData = Union[bytes, bytearray, memoryview, str]
Tty = Union[bool, "tuple[int, int]", None]

_vm_ids = itertools.count(1)


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


@dataclass(frozen=True)
class Image:
    """A bootable guest: kernel, initramfs and root image, plus the VM shape (memory, vcpus)
    and what every VM of it gets (environment, extra files)."""

    name: str
    hash: str
    kernel: str
    initrd: Optional[str]
    rootfs: str
    python_version: Optional[str] = None
    memory_mib: int = 256
    vcpus: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    boot_timeout: float = 60.0

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
    ) -> "Image":
        """Finds (or builds, on first use) guest image ``ref`` (None = the default image) and
        returns an Image that boots VMs of the given shape.

        ``env`` is added to every process's environment; ``extra_files`` (guest path → bytes,
        str or a host path) are written into every VM before it is handed out."""
        if memory_mib < 64:
            raise ValueError(f"memory_mib must be at least 64 (got {memory_mib})")
        if vcpus < 1:
            raise ValueError(f"vcpus must be at least 1 (got {vcpus})")
        paths = _core.ensure_image(
            ref, name, None if cache_dir is None else os.fspath(cache_dir), None, progress
        )
        files = {str(k): _file_bytes(v) for k, v in (extra_files or {}).items()}
        return cls(
            name=paths["name"],
            hash=paths["hash"],
            kernel=paths["kernel"],
            initrd=paths.get("initrd"),
            rootfs=paths["rootfs"],
            python_version=paths.get("python_version"),
            memory_mib=memory_mib,
            vcpus=vcpus,
            env=dict(env or {}),
            extra_files=files,
            boot_timeout=boot_timeout,
        )

    def boot(self) -> "Vm":
        """Cold-boots a fresh VM of this image (seconds under TCG)."""
        raw = _core.Vm.boot(
            self.kernel,
            self.initrd,
            self.rootfs,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            boot_timeout=self.boot_timeout,
        )
        vm = Vm(raw, env=self.env)
        try:
            for path, data in self.extra_files.items():
                vm.write_file(path, data)
        except BaseException:
            vm.release()
            raise
        return vm


class Vm:
    """A running microVM. Use as a context manager, or call ``release()``."""

    def __init__(self, raw: "_core.Vm", env: Optional[Mapping[str, str]] = None) -> None:
        self._vm = raw
        self._env = dict(env or {})
        self.id = f"vm-{next(_vm_ids)}"

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
    ) -> ExecResult:
        """Runs ``argv`` to completion; returns stdout, stderr, exit_code, timed_out,
        peak_rss_kib. ``stage_files`` (guest path → data) are written first; ``stdin`` is fed
        and then closed (without it, stdin is closed at once). A process that outlives
        ``timeout_ms`` is killed: exit_code -1, timed_out True."""
        return self._vm.exec(
            list(argv),
            stage_files=dict(stage_files) if stage_files else None,
            env=_merge_env(self._env, env),
            cwd=cwd,
            timeout_ms=timeout_ms,
            tty=tty,
            stdin=stdin,
        )

    def spawn(
        self,
        argv: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        tty: Tty = False,
    ) -> ExecChild:
        """Starts ``argv`` and returns its handle: write_stdin, close_stdin, read_stdout,
        read_stderr, signal, resize, wait, poll."""
        return self._vm.spawn(
            list(argv), env=_merge_env(self._env, env), cwd=cwd, timeout_ms=timeout_ms, tty=tty
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

    def read_file(self, path: str) -> bytes:
        """Reads a whole guest file."""
        return self._vm.read_file(path)

    def upload(self, host_path: PathLike, guest_path: str, mode: Optional[int] = None) -> int:
        """Copies a host file into the guest (streamed); mode defaults to the host file's."""
        return self._vm.upload(os.fspath(host_path), guest_path, mode)

    def download(self, guest_path: str, host_path: PathLike) -> int:
        """Copies a guest file to the host (streamed; the host file appears atomically)."""
        return self._vm.download(guest_path, os.fspath(host_path))

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

    @property
    def workdir(self) -> Optional[str]:
        w = self._vm.workdir
        return None if w is None else os.fspath(w)

    def release(self) -> None:
        """Kills the VM and removes its work dir. Idempotent."""
        self._vm.release()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "released"
        return f"<Vm {self.id} {state} qemu_pid={self.qemu_pid}>"
