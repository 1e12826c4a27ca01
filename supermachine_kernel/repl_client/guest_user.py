"""The unprivileged guest user the REPL and everything it starts run as (issue 16, item 3).

`c.MicroVMKernel.guest_user` picks it (`effective_user`): "" = the OCI image config's `User`
when it is not root, else `jovyan` (uid 1000, gid 100, home /home/jovyan, as Jupyter's docker
stacks); "image" = the image's `User`, root when it names none (no user is added); "root" keeps
root; any other name or `uid[:gid]` is taken as given.

`provision(vm, user)` runs once in the VM the warm snapshot is baked from (and in each cold-booted
VM), as root, before the REPL starts: the user is added to the guest's /etc/passwd (and its group
to /etc/group) when missing, for OCI images too; its home and /workspace are made and given to
it; then `/etc/supermachine/guest-user` names it. From then on the guest agent runs every request
that names no user as that user: spawns get no capabilities and no_new_privs, and the host's file
writes and reads (workspace sync, driver, id file) use its file-system ids, so they create files
it owns and never follow a symlink it planted anywhere it could not write itself
(core/agent/src/user.rs). The file lives in the guest's root, so every snapshot and restore keeps
it, whichever path restores the VM (pool, early restore, %restore, idle resume).
"""
from __future__ import annotations

import json
from typing import Any

ROOT_USERS = ("", "0", "root", "0:0", "root:root")
DEFAULT_USER = "jovyan"
DEFAULT_UID = 1000
DEFAULT_GID = 100  # "users", as the docker stacks' NB_GID
AGENT_FEATURE = "guest_user"
DEFAULT_USER_FILE = "/etc/supermachine/guest-user"
PROVISION_TIMEOUT_MS = 120_000


class GuestUserError(RuntimeError):
    """The guest user could not be set up in the image; the message says why and what to do."""


def effective_user(configured: str, image_user: str | None) -> str:
    """The user the REPL runs as: "root" or a user spec for the agent (see the module doc)."""
    configured = (configured or "").strip()
    if configured == "image":
        return image_user if image_user and image_user not in ROOT_USERS else "root"
    if configured:
        return "root" if configured in ROOT_USERS else configured
    if image_user and image_user not in ROOT_USERS:
        return image_user
    return DEFAULT_USER


def is_root(user: str) -> bool:
    return user in ROOT_USERS


# Run as `python3 -I -S -c PROVISION SPEC` by root in the guest (stdlib only, no NSS: the
# files are read and appended as text). Prints {"uid", "gid", "home"} as JSON.
PROVISION = r'''
import json, os, sys
spec, file = sys.argv[1], sys.argv[2]
uid0, gid0 = int(sys.argv[3]), int(sys.argv[4])
name, _, group = spec.partition(":")

def rows(path):
    try:
        with open(path) as f:
            return [l.rstrip("\n").split(":") for l in f if l.count(":") >= 2]
    except FileNotFoundError:
        return []

def append(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")

users, groups = rows("/etc/passwd"), rows("/etc/group")
entry = next((r for r in users if len(r) >= 6 and (r[0] == name or (name.isdigit() and r[2] == name))), None)
if entry is not None:
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5] or "/"
elif name.isdigit():
    uid, gid, home = int(name), 0, "/"
else:
    taken = {r[2] for r in users}
    uid = uid0
    while str(uid) in taken:
        uid += 1
    gid, home = gid0, "/home/" + name
    if not any(r[2] == str(gid) for r in groups):
        append("/etc/group", "%s:x:%d:" % ("users" if gid == 100 else name, gid))
        groups = rows("/etc/group")
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    append("/etc/passwd", "%s:x:%d:%d::%s:%s" % (name, uid, gid, home, shell))
if group:
    gid = int(group) if group.isdigit() else next(int(r[2]) for r in groups if r[0] == group)
for d in ([home] if home != "/" else []) + ["/workspace"]:
    os.makedirs(d, mode=0o755, exist_ok=True)
    for top, dirs, files in os.walk(d):
        os.lchown(top, uid, gid)
        for n in files + dirs:
            os.lchown(os.path.join(top, n), uid, gid)
os.chmod("/tmp", 0o1777)
os.makedirs(os.path.dirname(file), mode=0o755, exist_ok=True)
with open(file + ".tmp", "w") as f:
    f.write(spec + "\n")
os.chmod(file + ".tmp", 0o644)
os.replace(file + ".tmp", file)
print(json.dumps({"uid": uid, "gid": gid, "home": home}))
'''


def provision(vm: Any, user: str) -> dict:
    """Sets `user` up in the guest of `vm` as the module doc says (idempotent); returns its
    uid, gid and home. Raises GuestUserError when the guest's agent predates the guest user
    or the script fails."""
    features = getattr(vm, "agent_features", None) or []
    if AGENT_FEATURE not in features:
        raise GuestUserError(
            "this image's guest agent cannot run the REPL as an unprivileged user (it predates "
            "the guest user): rebuild it with `supermachine-kernel prepare`, or set "
            "c.MicroVMKernel.guest_user = 'root'")
    r = vm.exec(["python3", "-I", "-S", "-c", PROVISION, user, DEFAULT_USER_FILE,
                 str(DEFAULT_UID), str(DEFAULT_GID)], user="0", timeout_ms=PROVISION_TIMEOUT_MS)
    try:
        if r.exit_code != 0:
            raise ValueError(f"exit {r.exit_code}")
        out = json.loads(r.stdout.decode().strip().splitlines()[-1])
        return {"uid": int(out["uid"]), "gid": int(out["gid"]), "home": str(out["home"])}
    except (ValueError, KeyError, IndexError, TypeError) as e:
        err = r.stderr.decode(errors="replace").strip()[-500:]
        raise GuestUserError(
            f"could not set up the guest user {user!r} in the image ({e}): {err or 'no output'}. "
            f"Check that the image has python3 and a writable /etc, or set "
            f"c.MicroVMKernel.guest_user = 'root'") from None
