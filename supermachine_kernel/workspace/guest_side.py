"""The guest half of the workspace sync: stdlib only, runs in the guest's python3.

transfer.py runs this file's source as `python3 -I -S -c SOURCE COMMAND ROOT ...`:
    list ROOT OPTIONS_JSON   stdout: {"v": 1, "entries": [[path, kind, size, mtime_ns, mode],
                             ...], "unlisted": N}; kind is file, dir, symlink or special;
                             excludes applied while walking, symlinks never followed
    apply ROOT               stdin: {"delete": [...], "mkdir": [...], "utime": [[p, ns], ...]};
                             stdout: {"failed": [[path, why], ...]}
    read ROOT                stdin: [[path, max_bytes], ...]; stdout, per file: a header (4-byte
                             big-endian length + JSON {"size", "mode"} or {"error"}), exactly
                             "size" bytes, one status byte (0 read as announced, 1 the file
                             shrank and was padded); O_NOFOLLOW | O_NONBLOCK, regular files only
The functions are importable on their own so the guest REPL can run the same code in-process
(docs/issue13-workspace.md); `Watcher` is for that REPL: an inotify "dirty" flag, so a cell
that touched nothing in the workspace costs no listing (a check is ~0.1 ms under TCG). Everything here acts on the guest's own tree: the host trusts none
of its output (transfer.py parses it as hostile input).
"""
from __future__ import annotations

import errno
import json
import os
import stat
import struct
import sys


def list_tree(root: str, excludes: list[str], hidden: bool, max_entries: int) -> dict:
    """The tree under `root`, as the "list" command prints it (a dict)."""
    ex = set(excludes)
    out: list[list] = []
    unlisted = 0
    stack = [(root, "")]
    while stack:
        d, rel = stack.pop()
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for i, n in enumerate(reversed(names)):
            if len(out) >= max_entries:
                # Full: the rest of this directory is only counted, without an lstat each (a
                # hostile 100 000-file directory cost 14 s of lstats under TCG).
                unlisted += _count_rest(d, names[:len(names) - i], ex, hidden)
                break
            p = d + "/" + n
            try:
                st = os.lstat(p)
            except OSError:
                continue
            m = st.st_mode
            isdir = stat.S_ISDIR(m)
            if n in ex or (isdir and hidden and n.startswith(".")):
                continue
            r = rel + "/" + n if rel else n
            if len(out) >= max_entries:
                unlisted += 1
                continue
            if isdir:
                k = "dir"
            elif stat.S_ISREG(m):
                k = "file"
            elif stat.S_ISLNK(m):
                k = "symlink"
            else:
                k = "special"
            out.append([r, k, st.st_size if k == "file" else 0, st.st_mtime_ns, m & 0o777])
            if isdir:
                stack.append((p, r))
    return {"v": 1, "entries": out, "unlisted": unlisted}


def _count_rest(d: str, names: list, ex: set, hidden: bool) -> int:
    """How many of `names` in `d` a full listing would have counted as unlisted (only a
    hidden name needs an lstat, to tell a hidden directory from a file)."""
    n = 0
    for name in names:
        if name in ex:
            continue
        if hidden and name.startswith("."):
            try:
                if stat.S_ISDIR(os.lstat(d + "/" + name).st_mode):
                    continue
            except OSError:
                continue
        n += 1
    return n


def apply(root: str, ops: dict) -> dict:
    """Deletes (files, empty directories), then makes directories (replacing a non-directory
    in the way), then sets mtimes (taking the file over first when another user owns it:
    `_own`); returns {"failed": [[path, why], ...]}."""
    failed: list[list[str]] = []
    for r in ops.get("delete", []):
        p = root + "/" + r
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append([r, str(e)])
    for r in ops.get("mkdir", []):
        p = root + "/" + r
        try:
            if os.path.lexists(p) and not (os.path.isdir(p) and not os.path.islink(p)):
                os.unlink(p)
            os.makedirs(p, exist_ok=True)
        except OSError as e:
            failed.append([r, str(e)])
    for r, t in ops.get("utime", []):
        try:
            _own(root + "/" + r)
            os.utime(root + "/" + r, ns=(t, t), follow_symlinks=False)
        except OSError as e:
            failed.append([r, str(e)])
    return {"failed": failed}


def _own(p: str) -> None:
    """A regular file someone else owns (the agent writes copies as root) becomes this user's:
    copied into a file of ours beside it, renamed over it. So a non-root REPL can overwrite
    and re-time the files the host put there. Root owns everything it needs already."""
    uid = os.getuid()
    st = os.lstat(p)
    if uid == 0 or st.st_uid == uid or not stat.S_ISREG(st.st_mode):
        return
    tmp = "%s/.smk-own-%d" % (os.path.dirname(p), os.getpid())
    src = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            left = os.fstat(src).st_size
            while left > 0:
                n = os.sendfile(dst, src, None, min(left, 1 << 24))
                if n == 0:
                    break
                left -= n
            os.fchmod(dst, st.st_mode & 0o777)
        finally:
            os.close(dst)
        os.replace(tmp, p)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(src)


def _put(fd: int, b: bytes) -> None:
    while b:
        b = b[os.write(fd, b):]


def _head(fd: int, d: dict) -> None:
    b = json.dumps(d).encode()
    _put(fd, struct.pack(">I", len(b)) + b)


def read_files(root: str, wanted: list, out_fd: int) -> None:
    """Streams each [path, max_bytes] of `wanted` to `out_fd` in the "read" format."""
    for r, cap in wanted:
        try:
            fd = os.open(root + "/" + r, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            _head(out_fd, {"error": e.strerror or str(e)})
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                _head(out_fd, {"error": "not a regular file"})
                continue
            if st.st_size > cap:
                _head(out_fd, {"error": "larger than the limit", "size": st.st_size})
                continue
            _head(out_fd, {"size": st.st_size, "mode": st.st_mode & 0o777})
            left, short = st.st_size, 0
            while left:
                n = os.sendfile(out_fd, fd, None, min(left, 1 << 22))
                if n == 0:
                    n, short = min(left, 1 << 20), 1
                    _put(out_fd, bytes(n))
                left -= n
            _put(out_fd, bytes([short]))
        finally:
            os.close(fd)


# inotify(7) event bits.
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF = 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_WATCHED = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO
            | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")


class Watcher:
    """Whether anything in the tree under `root` (excludes applied as in `list_tree`) changed
    since the last `dirty()`. Without inotify (no ctypes, no syscall, the watch limit
    reached, the event queue overflowed) it answers True: "list to be sure"."""

    def __init__(self, root: str, excludes: list[str], hidden: bool) -> None:
        self.root, self._ex, self._hidden = root, set(excludes), hidden
        self._fd = -1
        self._paths: dict[int, str] = {}
        self._degraded = False
        try:
            import ctypes  # noqa: PLC0415 - not for the one-shot commands (python3 starts slowly under TCG)

            self._ctypes = ctypes
            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError, ImportError):
            fd = -1
        if fd < 0:
            return
        self._fd = fd
        self._watch_tree(root)

    def _skip(self, name: str, is_dir: bool) -> bool:
        return name in self._ex or (is_dir and self._hidden and name.startswith("."))

    def _watch_tree(self, top: str) -> None:
        stack = [top]
        while stack:
            d = stack.pop()
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(d), _WATCHED)
            if wd < 0:
                if self._ctypes.get_errno() not in (errno.ENOENT, errno.ENOTDIR):
                    self._degraded = True     # the watch limit: always "dirty" from now on
                continue
            self._paths[wd] = d
            # scandir's d_type says "directory" without a stat per entry (two stats each made
            # a re-watch of a 100 000-file directory cost ~20 s under TCG).
            try:
                with os.scandir(d) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False) and not self._skip(e.name, True):
                            stack.append(d + "/" + e.name)
            except OSError:
                continue

    def dirty(self) -> bool:
        if self._fd < 0:
            return True
        changed = self._degraded
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                return True
            if not data:
                break
            at = 0
            while at + _EVENT.size <= len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, at)
                raw = data[at + _EVENT.size: at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                if mask & _IN_IGNORED:
                    self._paths.pop(wd, None)
                    continue
                if mask & _IN_Q_OVERFLOW:
                    changed = True
                    self._rewatch()
                    continue
                name = os.fsdecode(raw)
                is_dir = bool(mask & _IN_ISDIR)
                if name and self._skip(name, is_dir):
                    continue
                if mask & _WATCHED:
                    changed = True
                if is_dir and mask & (_IN_CREATE | _IN_MOVED_TO) and wd in self._paths:
                    self._watch_tree(self._paths[wd] + "/" + name)
        return changed

    def _rewatch(self) -> None:
        for wd in list(self._paths):
            self._libc.inotify_rm_watch(self._fd, wd)
        self._paths.clear()
        self._degraded = False
        self._watch_tree(self.root)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def main(argv: list[str]) -> None:
    command, root = argv[1], argv[2]
    if command == "list":
        opt = json.loads(argv[3])
        result = list_tree(root, opt["excludes"], opt["hidden"], opt["max_entries"])
        sys.stdout.write(json.dumps(result))
    elif command == "apply":
        sys.stdout.write(json.dumps(apply(root, json.load(sys.stdin))))
    elif command == "read":
        read_files(root, json.load(sys.stdin), 1)
    else:
        sys.exit("unknown command " + command)


if __name__ == "__main__":
    main(sys.argv)
