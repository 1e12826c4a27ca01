"""A snapshot of a workspace tree: relative path -> (kind, size, mtime_ns, mode), with the
excludes and caps applied, and a record of what was left out and why.

Pure over its inputs: `scan()` reads the host tree (lstat only, never following a symlink and
never opening a file, so a 10 GB sparse file costs one stat); `admit()` applies the same
excludes and caps to any listing, so a guest listing (parsed in transfer.py) is judged by the
very rules the host tree is. Paths are '/'-joined, relative, validated by `check_relpath`.

What is left out is a `Skipped(path, reason, size)`; the reasons (`SKIP_REASONS`) are what
report.py words for the user. Excluded names are not "skipped": they are outside the workspace
sync by configuration and never reported.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

FILE = "file"
DIR = "dir"
KINDS = (FILE, DIR)

# Why an entry was left out. Caps: file_size, total_bytes, file_count. Kinds never synced:
# symlink, special (FIFO, socket, device). bad_name: a name the other side cannot hold safely.
# unreadable: the host could not stat/list it.
SKIP_REASONS = ("file_size", "total_bytes", "file_count", "symlink", "special", "bad_name",
                "unreadable")

# node_modules: a JavaScript project's dependencies, often tens of thousands of files, which
# would use up max_files before the notebook's own.
DEFAULT_EXCLUDES = (".ipynb_checkpoints", ".git", "__pycache__", "node_modules")
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 64
# Entries a scan or guest listing holds beyond max_files (so the report can name some of those
# the count cap left out) before it stops and only counts.
EXTRA_ENTRIES = 1000


@dataclass(frozen=True)
class Limits:
    """The caps and excludes of one workspace (from the kernel's `workspace_*` traits)."""
    max_file_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    max_files: int = 10_000
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    exclude_hidden_dirs: bool = True


@dataclass(frozen=True)
class Entry:
    kind: str          # FILE or DIR
    size: int          # bytes (0 for a directory)
    mtime_ns: int
    mode: int          # permission bits only (& 0o777)

    def signature(self) -> tuple:
        """What "changed" compares: a directory is a directory; a file its size and mtime."""
        return (DIR,) if self.kind == DIR else (FILE, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str        # one of SKIP_REASONS
    size: int = 0


@dataclass
class Scan:
    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    # Entries a listing did not name because it was cut short (guest listings only). A scan
    # with unlisted entries is incomplete: a path absent from it may still exist.
    unlisted: int = 0

    def skipped_paths(self) -> set[str]:
        return {s.path for s in self.skipped}


class BadPath(ValueError):
    """A relative workspace path that is not acceptable (absolute, `..`, NUL, ...)."""


def check_name(name: str) -> None:
    """One path component: non-empty, not `.`/`..`, no `/`, no NUL or control character,
    valid UTF-8 (no lone surrogates), at most 255 bytes."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise BadPath(f"invalid path component {name!r}")
    if "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadPath(f"path component {name!r} holds '/' or a control character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPath(f"path component {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise BadPath(f"path component of {len(encoded)} bytes exceeds {MAX_NAME_BYTES}")


def check_relpath(path: str) -> tuple[str, ...]:
    """The components of a relative workspace path, or BadPath: no absolute path, no `..` or
    `.`, no empty component (`a//b`, trailing `/`), at most 4096 bytes and 64 levels."""
    if not isinstance(path, str) or not path:
        raise BadPath("empty path")
    if path.startswith("/"):
        raise BadPath(f"absolute path {path!r}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise BadPath(f"path longer than {MAX_PATH_BYTES} bytes")
    parts = tuple(path.split("/"))
    if len(parts) > MAX_DEPTH:
        raise BadPath(f"path deeper than {MAX_DEPTH} levels")
    for p in parts:
        check_name(p)
    return parts


def is_excluded(name: str, is_dir: bool, limits: Limits) -> bool:
    """Whether a directory entry named `name` is outside the sync by configuration."""
    if name in limits.excludes:
        return True
    return is_dir and limits.exclude_hidden_dirs and name.startswith(".")


def admit(listing: Iterable[tuple[str, Entry]], limits: Limits,
          skipped: Iterable[Skipped] = ()) -> Scan:
    """Applies the caps to `listing` (paths already checked, excludes already applied) in path
    order, so the same tree always keeps the same files: a file over `max_file_bytes` is
    skipped; then entries are admitted while the count stays within `max_files` and the bytes
    within `max_total_bytes`. A directory whose parent was not admitted is not admitted either
    (its files are skipped as their parent's cap says)."""
    out = Scan(skipped=list(skipped))
    total = 0
    lost_dirs: dict[str, str] = {}
    for path, e in sorted(listing, key=lambda pe: pe[0].split("/")):
        parent = path.rpartition("/")[0]
        if parent and (parent in lost_dirs or parent not in out.entries):
            reason = lost_dirs.get(parent, "file_count")
            if e.kind == DIR:
                lost_dirs[path] = reason
            out.skipped.append(Skipped(path, reason, e.size))
            continue
        if e.kind == FILE and e.size > limits.max_file_bytes:
            out.skipped.append(Skipped(path, "file_size", e.size))
            continue
        if len(out.entries) >= limits.max_files:
            if e.kind == DIR:
                lost_dirs[path] = "file_count"
            out.skipped.append(Skipped(path, "file_count", e.size))
            continue
        if total + e.size > limits.max_total_bytes:
            out.skipped.append(Skipped(path, "total_bytes", e.size))
            continue
        total += e.size
        out.entries[path] = e
    return out


def scan(root: str | os.PathLike[str], limits: Limits) -> Scan:
    """The host workspace tree under `root` (the root itself is not an entry). Never follows a
    symlink (they are skipped, reason "symlink"), skips FIFOs, sockets and devices ("special")
    and names that are not valid UTF-8 or hold control characters ("bad_name").

    The walk stops after `max_files + EXTRA_ENTRIES` entries (a kernel started in a home
    directory must not stat a million files per cell); the scan is then incomplete
    (`unlisted` > 0, a lower bound), so plan.py deletes nothing it did not see."""
    listing: list[tuple[str, Entry]] = []
    skipped: list[Skipped] = []
    ceiling = limits.max_files + EXTRA_ENTRIES
    unlisted = 0
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        dir_path, rel = stack.pop()
        if len(listing) >= ceiling:
            unlisted += 1
            continue
        try:
            it = sorted(os.scandir(dir_path), key=lambda e: e.name, reverse=True)
        except OSError:
            if rel:
                skipped.append(Skipped(rel, "unreadable"))
            continue
        while it:
            d = it.pop()
            if len(listing) >= ceiling:
                unlisted += 1 + len(it)
                break
            name = d.name
            path = f"{rel}/{name}" if rel else name
            try:
                st = d.stat(follow_symlinks=False)
            except OSError:
                skipped.append(Skipped(path, "unreadable"))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_excluded(name, is_dir, limits):
                continue
            try:
                check_name(name)
                if path.count("/") >= MAX_DEPTH or len(path.encode()) > MAX_PATH_BYTES:
                    raise BadPath(path)
            except BadPath:
                skipped.append(Skipped(path, "bad_name"))
                continue
            if stat.S_ISLNK(st.st_mode):
                skipped.append(Skipped(path, "symlink"))
            elif is_dir:
                listing.append((path, Entry(DIR, 0, st.st_mtime_ns, st.st_mode & 0o777)))
                stack.append((d.path, path))
            elif stat.S_ISREG(st.st_mode):
                listing.append((path, Entry(FILE, st.st_size, st.st_mtime_ns, st.st_mode & 0o777)))
            else:
                skipped.append(Skipped(path, "special"))
    out = admit(listing, limits, skipped)
    out.unlisted = unlisted
    return out
