"""The Hub's part of the limits (runs as root, before a user's server starts): the user's
cgroup made, its limits written and handed to the user; the state directories made; and, for
cgroup v2, the server itself started inside the user's group, so that the user's kernels (each
its own leaf, limits/kernel.py) stay under the user's ceiling whoever starts them.

In `jupyterhub_config.py` (deploy/jupyterhub/limits.md):

    load_subconfig("/etc/supermachine-kernel/limits.py")     # the same file the kernels read
    from supermachine_kernel.limits.hub import pre_spawn_hook
    c.Spawner.pre_spawn_hook = pre_spawn_hook
    c.JupyterHub.spawner_class = "supermachine_kernel.limits.hub.LimitedLocalProcessSpawner"

Handing over: cgroup v1, the user's groups' `cgroup.procs` and `tasks` become the user's (a
kernel may then join them; the limit files stay root's). cgroup v2, the user's group is
delegated (the directory, `cgroup.procs`, `cgroup.threads`, `cgroup.subtree_control` become the
user's, the limits stay root's: the kernel-<pid> leaves the kernels make are below them).
"""
from __future__ import annotations

import functools
import os
import pwd
import typing as t

from . import limits_file
from .cgroup import HostFacts, Outcome, Plan, apply, plan
from .config import MicroVMLimits, load

_V1_HANDED = ("cgroup.procs", "tasks")
_V2_HANDED = ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control")


def user_groups(p: Plan) -> list[str]:
    """The user's own groups in a plan (where its limits are written)."""
    return sorted({w.path for w in p.writes})


def prepare_user(limits: MicroVMLimits, uid: int, gid: int,
                 facts: HostFacts | None = None) -> tuple[Plan, Outcome]:
    """As root: the state directories, the user's groups with their limits, handed to `uid`."""
    for path, mode in ((limits.state_dir, 0o1777), (os.path.join(limits.state_dir, "host"),
                                                     0o1777)):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
    user_dir = os.path.join(limits.state_dir, f"user-{uid}")
    os.makedirs(user_dir, mode=0o700, exist_ok=True)
    os.chown(user_dir, uid, gid)
    os.chmod(user_dir, 0o700)
    p = plan(limits, facts or HostFacts.read(), uid, 0)
    if p.mode == "none":
        return p, Outcome("none", not_enforced=dict(p.not_enforced))
    groups = user_groups(p)
    # The groups and their limits, without moving anyone in (the hub's own pid stays put).
    out = apply(Plan(p.mode, uid, groups=[g for g in p.groups if "/kernel-" not in g],
                     subtree=p.subtree, writes=p.writes), 0)
    for group in groups:
        for name in (_V2_HANDED if p.mode == "v2" else _V1_HANDED):
            try:
                os.chown(os.path.join(group, name), uid, gid)
            except FileNotFoundError:
                pass
    return p, out


def enter_user_cgroup(p: Plan, pid: int) -> None:
    """As root: `pid` (the user's server, before it drops root) into the user's group; for v2
    into a `server` leaf of it (v2 keeps processes out of groups with children)."""
    for group in user_groups(p):
        target = group
        if p.mode == "v2":
            target = os.path.join(group, "server")
            os.makedirs(target, exist_ok=True)
            os.chown(target, p.uid, -1)
            for name in ("cgroup.procs", "cgroup.threads"):
                os.chown(os.path.join(target, name), p.uid, -1)
        with open(os.path.join(target, "cgroup.procs"), "w") as f:
            f.write(str(pid))


def pre_spawn_hook(spawner: t.Any) -> None:
    """`c.Spawner.pre_spawn_hook`: prepare_user for the spawner's user (when limits are set)."""
    limits = load(limits_file())
    if limits is None or not limits.any_set():
        return
    entry = pwd.getpwnam(spawner.user.name)
    _, out = prepare_user(limits, entry.pw_uid, entry.pw_gid)
    spawner.log.info("limits for %s: %s enforced; %s not (%s)", spawner.user.name,
                     sorted(out.enforced), sorted(out.not_enforced), out.not_enforced)


@functools.cache
def _spawner_class() -> type:
    # Only on the Hub; jupyterhub has no type information.
    from jupyterhub import spawner  # type: ignore[import-untyped, import-not-found, unused-ignore]

    class LimitedLocalProcessSpawner(spawner.LocalProcessSpawner):  # type: ignore[misc, unused-ignore]
        """LocalProcessSpawner whose server starts inside its user's cgroup (needed for cgroup
        v2; harmless on v1, where each kernel joins by itself)."""

        def make_preexec_fn(self, name: str) -> t.Callable[[], None]:
            drop_root = super().make_preexec_fn(name)
            limits = load(limits_file())
            entry = pwd.getpwnam(name)
            p = plan(limits, HostFacts.read(), entry.pw_uid, 0) if limits is not None else None

            def preexec() -> None:
                if p is not None and p.mode != "none":
                    enter_user_cgroup(p, os.getpid())
                drop_root()

            return preexec

    return LimitedLocalProcessSpawner


def __getattr__(name: str) -> t.Any:
    if name == "LimitedLocalProcessSpawner":
        return _spawner_class()
    raise AttributeError(name)
