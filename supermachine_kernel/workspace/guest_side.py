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
(docs/issue13-workspace.md). Everything here acts on the guest's own tree: the host trusts none
of its output (transfer.py parses it as hostile input).
"""
from __future__ import annotations

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
        for n in reversed(names):
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


def apply(root: str, ops: dict) -> dict:
    """Deletes (files, empty directories), then makes directories (replacing a non-directory
    in the way), then sets mtimes; returns {"failed": [[path, why], ...]}."""
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
            os.utime(root + "/" + r, ns=(t, t), follow_symlinks=False)
        except OSError as e:
            failed.append([r, str(e)])
    return {"failed": failed}


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
