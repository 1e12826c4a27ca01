"""Counting VMs across kernel processes: each kernel holds a *slot* for the VM its cells run in,
one per user and one host-wide, as a `flock` on a lock file. The lock belongs to the kernel
process's open file, so it goes when the process does, however it ends (SIGKILL included):
the counts never need cleaning up.

Layout under `MicroVMLimits.state_dir` (mode 1777, like /tmp):

    host/slot-<n>.lock        host-wide slots (n < host_max_vms); no content
    host/.mutex               held while a kernel counts and takes a host slot
    user-<uid>/slot-<n>.lock  the user's slots; content: {"pid", "memory_mib", "label"}
    user-<uid>/.mutex         held while a kernel counts and takes one of the user's slots

The per-user directory must belong to its user (another user could otherwise plant it). These
counts are kept by the kernels themselves: they bind every kernel and every guest, not a user
who runs QEMU by hand (the cgroup does, cgroup.py).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import stat
from dataclasses import dataclass

from . import limits_file
from .config import MicroVMLimits


class LimitExceeded(Exception):
    """A limit refuses this kernel start or snapshot; the message names the limit, the
    setting and who can raise it."""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _who(limits: MicroVMLimits, setting: str) -> str:
    return (f"c.MicroVMLimits.{setting} = {getattr(limits, setting)!r}, set by the host's admin "
            f"in {limits_file()}")


def check_vm_size(limits: MicroVMLimits, memory_mib: int, vcpus: int) -> None:
    """The per-VM limits against this kernel's VM size (c.MicroVMKernel.memory_mib/vcpus)."""
    cap = limits.memory_per_vm_mib
    if cap and memory_mib > cap:
        raise LimitExceeded(
            f"this kernel's VM would have {memory_mib} MiB of guest memory, more than the "
            f"{cap} MiB per VM this host allows ({_who(limits, 'memory_per_vm')}). Lower "
            f"c.MicroVMKernel.memory_mib to {cap} or less, or ask the admin to raise "
            "c.MicroVMLimits.memory_per_vm.")
    if limits.vcpus_per_vm and vcpus > limits.vcpus_per_vm:
        raise LimitExceeded(
            f"this kernel's VM would have {vcpus} vCPUs, more than the {limits.vcpus_per_vm} "
            f"per VM this host allows ({_who(limits, 'vcpus_per_vm')}). Lower "
            "c.MicroVMKernel.vcpus, or ask the admin to raise c.MicroVMLimits.vcpus_per_vm.")


def check_snapshot_quota(limits: MicroVMLimits, used_bytes: int, uid: int,
                         taken_bytes: int = 0) -> None:
    """The user's snapshots use `used_bytes` (including a snapshot of `taken_bytes` just
    taken, which the caller then removes). Raises LimitExceeded when over the quota."""
    quota = limits.snapshot_quota_mib * 1024 * 1024
    over = used_bytes > quota if taken_bytes else used_bytes >= quota
    if not quota or not over:
        return
    mib = 1024 * 1024
    what = (f"this snapshot ({taken_bytes / mib:.0f} MiB) would bring {user_name(uid)}'s "
            f"snapshots to {used_bytes / mib:.0f} MiB" if taken_bytes else
            f"{user_name(uid)}'s snapshots already use {used_bytes / mib:.0f} MiB")
    raise LimitExceeded(
        f"snapshot quota reached: {what}, and the quota is {quota / mib:.0f} MiB "
        f"({_who(limits, 'snapshot_quota')}). Free space with %snapshot --delete NAME "
        "(%snapshot --report lists them), or ask the admin to raise "
        "c.MicroVMLimits.snapshot_quota.")


@dataclass(frozen=True)
class Usage:
    vms: int
    memory_mib: int


class _Mutex:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> _Mutex:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing drops the lock


def _try_lock(path: str) -> int | None:
    """An fd holding `path`'s lock, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR if os.access(path, os.W_OK) else os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _slots(directory: str) -> list[str]:
    return sorted((n for n in os.listdir(directory) if n.startswith("slot-")
                   and n.endswith(".lock")), key=lambda n: int(n[5:-5]) if n[5:-5].isdigit() else -1)


class Ledger:
    """The slots under one state directory (see the module doc)."""

    def __init__(self, limits: MicroVMLimits, uid: int | None = None) -> None:
        self.limits = limits
        self.root = limits.state_dir
        self.uid = os.geteuid() if uid is None else uid

    # -- directories -----------------------------------------------------------------------------

    def _shared_dir(self, path: str) -> str:
        """A directory every user writes into: created 1777 when missing."""
        try:
            os.makedirs(path, exist_ok=True)
            if os.stat(path).st_uid == os.geteuid():
                os.chmod(path, 0o1777)
        except OSError as e:
            raise LimitExceeded(
                f"the limits state directory {path} cannot be created ({e.strerror}): the "
                f"host's VM limits cannot be counted. The admin creates it (mode 1777) or sets "
                "c.MicroVMLimits.state_dir.") from None
        return path

    def user_dir(self) -> str:
        path = os.path.join(self._shared_dir(self.root), f"user-{self.uid}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.uid or st.st_mode & 0o022:
            raise LimitExceeded(
                f"{path} does not belong to {user_name(self.uid)} (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o}): the VM limits cannot be counted safely. The "
                "admin should remove it; the next kernel start recreates it.")
        return path

    def host_dir(self) -> str:
        return self._shared_dir(os.path.join(self._shared_dir(self.root), "host"))

    # -- counting --------------------------------------------------------------------------------

    def user_usage(self) -> Usage:
        directory = self.user_dir()
        with _Mutex(os.path.join(directory, ".mutex")):
            return self._user_usage(directory)[0]

    def _user_usage(self, directory: str) -> tuple[Usage, list[str]]:
        vms = memory = 0
        free: list[str] = []
        for name in _slots(directory):
            path = os.path.join(directory, name)
            fd = _try_lock(path)
            if fd is not None:
                os.close(fd)
                free.append(name)
                continue
            vms += 1
            try:
                with open(path) as f:
                    memory += int(json.load(f).get("memory_mib", 0))
            except (OSError, ValueError, AttributeError, TypeError):
                pass
        return Usage(vms, memory), free

    def host_usage(self) -> int:
        directory = self.host_dir()
        held = 0
        for name in _slots(directory):
            fd = _try_lock(os.path.join(directory, name))
            if fd is None:
                held += 1
            else:
                os.close(fd)
        return held

    # -- taking a slot ---------------------------------------------------------------------------

    def acquire(self, memory_mib: int, label: str = "") -> Slot:
        """Takes a user slot (and a host slot when host_max_vms is set) for a VM of
        `memory_mib`, or raises LimitExceeded naming the limit."""
        limits = self.limits
        directory = self.user_dir()
        fds: list[int] = []
        try:
            with _Mutex(os.path.join(directory, ".mutex")):
                usage, free = self._user_usage(directory)
                if limits.vms_per_user and usage.vms >= limits.vms_per_user:
                    raise LimitExceeded(
                        f"VM limit reached: {user_name(self.uid)}'s kernels run {usage.vms} "
                        f"VMs, the most one user may run ({_who(limits, 'vms_per_user')}). "
                        "Shut down one of your other kernels, or ask the admin to raise "
                        "c.MicroVMLimits.vms_per_user.")
                cap = limits.memory_per_user_mib
                if cap and usage.memory_mib + memory_mib > cap:
                    raise LimitExceeded(
                        f"memory limit reached: {user_name(self.uid)}'s {usage.vms} running "
                        f"VMs have {usage.memory_mib} MiB of guest memory; this kernel's "
                        f"{memory_mib} MiB more would pass the {cap} MiB one user may have "
                        f"({_who(limits, 'memory_per_user')}). Shut down another kernel, "
                        "lower c.MicroVMKernel.memory_mib, or ask the admin to raise "
                        "c.MicroVMLimits.memory_per_user.")
                name = free[0] if free else f"slot-{self._next_index(directory)}.lock"
                path = os.path.join(directory, name)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free under the mutex
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "memory_mib": memory_mib,
                                         "label": label}).encode())
            if limits.host_max_vms:
                fds.append(self._host_slot())
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Slot(fds, memory_mib)

    @staticmethod
    def _next_index(directory: str) -> int:
        taken = [int(n[5:-5]) for n in _slots(directory) if n[5:-5].isdigit()]
        return max(taken, default=-1) + 1

    def _host_slot(self) -> int:
        directory = self.host_dir()
        cap = self.limits.host_max_vms
        with _Mutex(os.path.join(directory, ".mutex")):
            for n in range(cap):
                path = os.path.join(directory, f"slot-{n}.lock")
                if not os.path.exists(path):
                    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644))
                fd = _try_lock(path)
                if fd is not None:
                    return fd
        raise LimitExceeded(
            f"this host runs {cap} VMs already, the most it allows for all users together "
            f"({_who(self.limits, 'host_max_vms')}). Try again when another kernel has "
            "ended, or ask the admin to raise c.MicroVMLimits.host_max_vms.")


class Slot:
    """The slots one kernel holds (its lock files' descriptors); `release()` frees them, and
    so does the process's end."""

    def __init__(self, fds: list[int], memory_mib: int) -> None:
        self._fds = fds
        self.memory_mib = memory_mib

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
