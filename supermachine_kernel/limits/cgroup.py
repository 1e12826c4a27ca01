"""Enforcing a user's memory ceiling and CPU share with cgroups, and saying plainly when that
is not possible.

`plan()` is pure: from the host's facts (`HostFacts.read()`: /proc/self/mounts,
/proc/self/cgroup, the v2 root's controllers, the effective uid) and the limits it decides
where the user's group lives and how each limit is held, or why it cannot be:

- cgroup v2 (`cgroup2` mounted with the `cpu` and `memory` controllers): one group per user,
  `<v2>/<cgroup_name>/user-<uid>` with `memory.max` and `cpu.weight`, and one leaf per kernel
  process under it (`kernel-<pid>`: v2 keeps processes in leaves only). When the kernel already
  runs inside its user's group (the Hub's spawner put the whole server there: a delegated
  subtree) it only adds its leaf.
- cgroup v1 (`cpu` and `memory` hierarchies mounted, as on hybrid hosts where v2 holds no
  controllers): `<cpu>/<cgroup_name>/user-<uid>` with `cpu.shares` and
  `<memory>/<cgroup_name>/user-<uid>` with `memory.limit_in_bytes`; the kernel process joins
  both (its QEMU children are then in them too).
- Otherwise, or when the groups can neither be created (not root) nor joined: not enforced,
  with the reason.

`apply()` carries a plan out for a process (the kernel's own pid at start), reads each value
back and returns what holds. Every other limit is counted by the kernels (accounting.py).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from .config import MicroVMLimits


@dataclass(frozen=True)
class HostFacts:
    mounts: tuple[tuple[str, str, str], ...]  # (mount point, fs type, options)
    self_cgroup: tuple[tuple[str, str, str], ...]  # (hierarchy id, controllers, path)
    v2_controllers: frozenset[str]  # of the cgroup2 mount's root
    euid: int

    @classmethod
    def read(cls) -> HostFacts:
        mounts = []
        try:
            with open("/proc/self/mounts") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                        mounts.append((parts[1], parts[2], parts[3]))
        except OSError:
            pass
        groups = []
        try:
            with open("/proc/self/cgroup") as f:
                for line in f:
                    parts = line.rstrip("\n").split(":", 2)
                    if len(parts) == 3:
                        groups.append((parts[0], parts[1], parts[2]))
        except OSError:
            pass
        controllers: frozenset[str] = frozenset()
        v2 = next((m for m, fs, _ in mounts if fs == "cgroup2"), None)
        if v2 is not None:
            try:
                with open(os.path.join(v2, "cgroup.controllers")) as f:
                    controllers = frozenset(f.read().split())
            except OSError:
                pass
        return cls(tuple(mounts), tuple(groups), controllers, os.geteuid())


@dataclass(frozen=True)
class Write:
    """One value for one cgroup file (`path` is the group's directory)."""
    path: str
    file: str
    value: str
    limit: str  # the MicroVMLimits trait it holds


@dataclass
class Plan:
    mode: str  # "v2", "v1" or "none"
    uid: int
    groups: list[str] = field(default_factory=list)  # directories to create, in order
    subtree: list[str] = field(default_factory=list)  # v2: groups whose children get cpu/memory
    writes: list[Write] = field(default_factory=list)
    join: list[str] = field(default_factory=list)  # groups the process joins
    not_enforced: dict[str, str] = field(default_factory=dict)  # limit -> why
    inside_already: bool = False  # v2: the process is inside its user's group already


def _wanted(limits: MicroVMLimits) -> dict[str, tuple[str, int]]:
    """The cgroup-enforced limits that are set: trait -> (controller, value)."""
    out: dict[str, tuple[str, int]] = {}
    if limits.memory_per_user_mib:
        out["memory_per_user"] = ("memory", limits.memory_per_user_mib * 1024 * 1024)
    if limits.cpu_weight:
        out["cpu_weight"] = ("cpu", limits.cpu_weight)
    return out


def _v1_mount(facts: HostFacts, controller: str) -> str | None:
    for mount, fs, options in facts.mounts:
        if fs == "cgroup" and controller in options.split(","):
            return mount
    return None


def plan(limits: MicroVMLimits, facts: HostFacts, uid: int, pid: int) -> Plan:
    """How this host can hold `limits` for user `uid`'s kernel process `pid` (pure)."""
    wanted = _wanted(limits)
    if not wanted:
        return Plan("none", uid)
    if limits.cgroups == "off":
        return Plan("none", uid, not_enforced={
            k: "c.MicroVMLimits.cgroups = 'off'" for k in wanted})
    needed = {controller for controller, _ in wanted.values()}
    v2 = next((m for m, fs, _ in facts.mounts if fs == "cgroup2"), None)
    v2_ok = v2 is not None and needed <= facts.v2_controllers
    v1 = {c: _v1_mount(facts, c) for c in needed}
    v1_ok = all(v1.values())
    if limits.cgroups == "v2" and not v2_ok or limits.cgroups == "v1" and not v1_ok or \
            not (v2_ok or v1_ok):
        if v2 is None:
            why = "no cgroup2 file system is mounted"
        else:
            missing = sorted(needed - facts.v2_controllers)
            why = (f"cgroup v2 at {v2} has no {'/'.join(missing)} controller" if missing else
                   "cgroup v2 was not chosen")
        missing_v1 = sorted(c for c, m in v1.items() if m is None)
        why += ("; the cgroup v1 " + "/".join(missing_v1) + " hierarchy is not mounted"
                if missing_v1 else "; cgroup v1 was not chosen (c.MicroVMLimits.cgroups)")
        return Plan("none", uid, not_enforced={k: why for k in wanted})
    name = limits.cgroup_name.strip("/")
    if v2_ok and limits.cgroups in ("auto", "v2"):
        assert v2 is not None
        base = os.path.join(v2, name)
        user = os.path.join(base, f"user-{uid}")
        current = next((p for h, _, p in facts.self_cgroup if h == "0"), "")
        inside = os.path.join(v2, current.lstrip("/")).startswith(user + os.sep) or \
            os.path.join(v2, current.lstrip("/")) == user
        p = Plan("v2", uid, inside_already=inside)
        p.groups = [base, user, os.path.join(user, f"kernel-{pid}")]
        p.subtree = [v2, base, user]
        for limit, (controller, value) in wanted.items():
            file = "memory.max" if controller == "memory" else "cpu.weight"
            p.writes.append(Write(user, file, str(value), limit))
        p.join = [os.path.join(user, f"kernel-{pid}")]
        return p
    p = Plan("v1", uid)
    for limit, (controller, value) in wanted.items():
        mount = v1[controller]
        assert mount is not None
        user = os.path.join(mount, name, f"user-{uid}")
        p.groups += [os.path.join(mount, name), user]
        if controller == "memory":
            p.writes.append(Write(user, "memory.limit_in_bytes", str(value), limit))
        else:
            p.writes.append(Write(user, "cpu.shares", str(max(2, value * 1024 // 100)), limit))
        p.join.append(user)
    return p


@dataclass
class Outcome:
    """What holds after `apply`: limit -> how it is enforced, or why it is not."""
    mode: str
    enforced: dict[str, str] = field(default_factory=dict)
    not_enforced: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # the groups the process is in


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def apply(p: Plan, pid: int) -> Outcome:
    """Creates the groups (when this process may), writes the limits (when it may), moves
    `pid` in and reads every limit back. Never raises for a host that refuses: what could not
    be done is in `not_enforced`."""
    out = Outcome(p.mode, not_enforced=dict(p.not_enforced))
    if p.mode == "none":
        return out
    failed = ""
    for group in p.groups:
        if p.mode == "v2" and p.inside_already and not group.endswith(f"kernel-{pid}"):
            continue
        try:
            os.mkdir(group, 0o755)
        except FileExistsError:
            pass
        except OSError as e:
            failed = failed or f"cannot create {group}: {e.strerror}"
    if p.mode == "v2":
        for group in p.subtree:
            if p.inside_already and group != p.groups[1]:
                continue
            try:
                have = set(_read(os.path.join(group, "cgroup.subtree_control")).split())
                need = {c for c in ("cpu", "memory") if c not in have}
                if need:
                    _write(os.path.join(group, "cgroup.subtree_control"),
                           " ".join("+" + c for c in sorted(need)))
            except OSError as e:
                failed = failed or f"cannot enable cpu/memory under {group}: {e.strerror}"
    for w in p.writes:
        target = os.path.join(w.path, w.file)
        try:
            if _read(target) != w.value:
                _write(target, w.value)
        except OSError as e:
            # Not ours to set (a non-root kernel): the admin's values may already be there.
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                failed = failed or f"cannot write {target}: {e.strerror}"
    for group in p.join:
        try:
            _write(os.path.join(group, "cgroup.procs"), str(pid))
            out.groups.append(group)
        except OSError as e:
            failed = failed or f"cannot move pid {pid} into {group}: {e.strerror}"
    for w in p.writes:
        target = os.path.join(w.path, w.file)
        joined = not p.join or any(g == w.path or g.startswith(w.path + os.sep)
                                   for g in out.groups)  # no join: only the limits asked
        try:
            value = _read(target)
        except OSError as e:
            value = f"unreadable ({e.strerror})"
        if joined and value == w.value:
            out.enforced[w.limit] = f"cgroup {p.mode} {w.file} = {value} on {w.path}"
        elif not joined:
            out.not_enforced[w.limit] = failed or f"the kernel is not in {w.path}"
        else:
            out.not_enforced[w.limit] = (
                f"{target} is {value}, not {w.value}"
                + (f" ({failed})" if failed else " (only root or the Hub's spawner can set it)"))
    return out


def remove_stale_leaves(p: Plan) -> None:
    """v2: the kernel-<pid> leaves of ended kernels (empty groups) go."""
    if p.mode != "v2" or len(p.groups) < 2:
        return
    user = p.groups[1]
    try:
        names = os.listdir(user)
    except OSError:
        return
    for name in names:
        if name.startswith("kernel-"):
            try:
                os.rmdir(os.path.join(user, name))  # fails (EBUSY) while processes are in it
            except OSError:
                pass
