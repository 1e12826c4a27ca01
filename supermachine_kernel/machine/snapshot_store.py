"""The on-disk store behind %snapshot / %restore / %snapshots: whole-VM snapshots kept per notebook.

    <jupyter_data_dir>/supermachine-kernel/snapshots/
      <notebook-key>/          one folder per notebook (per kernel when the notebook is unknown)
        index.json             {"notebook": label, "snapshots": {name: entry}}
        .lock                  flock held while index.json changes (two kernels, one notebook)
        <name>/                a runtime snapshot: metadata.json, state[, memory]
                               (core/runtime/src/snapshot/format.rs; written atomically by it)

The store lives in the user's Jupyter data directory (``jupyter --data-dir``; honours
JUPYTER_DATA_DIR), so snapshots outlive the kernel and the machine's reboots and a later kernel
of the same notebook finds them. A plain name (``s1``) is resolved in the kernel's own folder;
another folder's snapshots are reached only when the user names the folder (``GROUP/s1``, the
folder names ``%snapshots --all`` lists). Nothing here takes a path from the user: folder and
snapshot names are checked against the patterns below.

The folder ("group") comes from what the frontend tells the kernel: Jupyter Server puts the
notebook's path in the kernel's environment as JPY_SESSION_NAME (relative to the server root;
the kernel's working directory is the notebook's folder). Without it (nbclient, papermill,
jupyter console, any jupyter_client frontend) the group is the kernel's own: jupyter_client's
kernel manager keeps the connection file, and the session key in it, across both kinds of
restart, so `kernel_id` derives the group from them (the kernel id itself when the file is
Jupyter Server's ``kernel-<uuid>.json``). Only a kernel started without a connection file falls
back to its session id, which changes with every process.

Sizes are actual disk usage (allocated blocks), so a sparse memory file counts for the pages it
holds, not its length. The index is a cache of names, parents and the REPL's process id; the
snapshot directories are the truth: an entry whose directory vanished is dropped, a directory
without an entry (e.g. written by a kernel that died before updating the index) is listed from
its metadata.json.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Optional

from jupyter_core.paths import jupyter_data_dir

INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
OTHERS_HINT = "`%snapshots --all` lists other notebooks' (restore one with `%restore GROUP/NAME`)"
DEFAULT_PREFIX = "snap-"


class StoreError(Exception):
    """A snapshot name or store operation the user has to fix (the message says how)."""


def default_root() -> str:
    return os.path.join(jupyter_data_dir(), "supermachine-kernel", "snapshots")


def make_private_dirs(root: str, path: str) -> None:
    """Creates `path` (under the store's `root`) with `root` and `path` readable by their owner
    only: a snapshot holds the guest's memory and files, and home directories are often
    world-readable (Debian's default HOME_MODE follows umask 022). Tightens a store created
    before this was the rule."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for d in (root, path):
        if stat.S_IMODE(os.stat(d).st_mode) & 0o077:
            os.chmod(d, 0o700)


def disk_usage(path: str) -> int:
    """Bytes allocated on disk under ``path`` (sparse-aware: holes cost nothing)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not os.path.isdir(path):
        return st.st_blocks * 512
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def validate_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise StoreError(
            f"invalid snapshot name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "notebook"
    return s[:limit]


def kernel_id(connection_file: Optional[str], session_key: bytes = b"") -> Optional[str]:
    """An id every start of one kernel shares, from the connection file it was given (None
    without one).

    jupyter_client's kernel manager writes the connection file once and keeps it, with its
    session key, across ``restart_kernel()`` with or without ``now=True``. Jupyter Server (any
    MultiKernelManager) names it ``kernel-<kernel id>.json``: that id is used as is. A plain
    KernelManager (nbclient, papermill) uses a temporary name and jupyter console
    ``kernel-<its pid>.json``, names a later kernel may get again, so the id is the name plus a
    digest of the file's path and the session key (random per kernel manager).
    """
    if not connection_file:
        return None
    stem = os.path.basename(connection_file)
    stem = stem[:-len(".json")] if stem.endswith(".json") else stem
    stem = stem[len("kernel-"):] if stem.startswith("kernel-") else stem
    if UUID_RE.match(stem):
        return stem.lower()
    path = os.path.realpath(connection_file)
    digest = hashlib.sha256(path.encode() + b"\0" + bytes(session_key or b"")).hexdigest()[:10]
    return f"{_slug(stem, 40)}-{digest}"


def notebook_key(env: Mapping[str, str], cwd: str, kernel_id: Optional[str],
                 session_id: str) -> tuple[str, str]:
    """(folder name, human label) for the notebook this kernel serves.

    JPY_SESSION_NAME (Jupyter Server: the notebook path relative to the server root; the
    kernel's cwd is the notebook's folder) → "<stem>-<hash of the absolute path>". Else the
    kernel id (`kernel_id`: stable across restarts of one kernel), else the session id.
    """
    name = (env.get("JPY_SESSION_NAME") or "").strip()
    if name:
        path = name if os.path.isabs(name) else os.path.join(cwd, os.path.basename(name))
        path = os.path.normpath(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        digest = hashlib.sha256(path.encode()).hexdigest()[:10]
        return f"{_slug(stem)}-{digest}", path
    if kernel_id:
        return (f"kernel-{_slug(kernel_id, 64)}",
                f"kernel {kernel_id}, started in {cwd} (notebook path unknown)")
    return (f"session-{_slug(session_id, 64)}",
            f"kernel session {session_id}, started in {cwd} (notebook path unknown; this group "
            "is not found again after a restart)")


def split_ref(ref: str) -> tuple[Optional[str], str]:
    """``NAME`` → (None, NAME); ``GROUP/NAME`` → (GROUP, NAME), both checked."""
    group, sep, name = ref.rpartition("/")
    if not sep:
        return None, validate_name(name)
    if not GROUP_RE.match(group):
        raise StoreError(f"invalid snapshot group {group!r} in {ref!r}: use a group name that "
                         "`%snapshots --all` lists, as GROUP/NAME")
    return group, validate_name(name)


@dataclass
class NotebookSnapshot:
    """One snapshot of a notebook, as the store's index records it (%snapshot took it)."""

    name: str
    created: float  # unix seconds
    size_bytes: int = 0
    parent: Optional[str] = None  # the snapshot this session's state came from, if any
    repl_id: Optional[int] = None  # guest process id of the REPL inside the snapshot
    took_s: Optional[float] = None
    execution_count: Optional[int] = None
    kind: Optional[str] = None  # template | full (how the runtime stored the RAM)
    extra: dict = field(default_factory=dict)
    # The folder it is in, when that is not the kernel's own (never written to the index).
    group: Optional[str] = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        """How the user names it from this kernel: NAME, or GROUP/NAME for another folder's."""
        return f"{self.group}/{self.name}" if self.group else self.name

    @classmethod
    def from_json(cls, name: str, d: Mapping) -> "NotebookSnapshot":
        known = {k: d[k] for k in ("created", "size_bytes", "parent", "repl_id", "took_s",
                                   "execution_count", "kind") if k in d}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("name", "group")}
        return cls(name=name, extra=extra, **known)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("name")
        d.pop("group")
        extra = d.pop("extra")
        d.update(extra)
        return d


class NotebookSnapshots:
    """The snapshots of one notebook (one group): ``<root>/<key>/``. ``foreign``: another group
    than the kernel's own, whose entries are named GROUP/NAME (`NotebookSnapshot.ref`)."""

    def __init__(self, root: str, key: str, label: str, foreign: bool = False) -> None:
        self.root = root
        self.key = key
        self.label = label
        self.foreign = foreign
        self.dir = os.path.join(root, key)

    # -- index ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        make_private_dirs(self.root, self.dir)
        with open(os.path.join(self.dir, LOCK_FILE), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_index(self) -> dict:
        try:
            with open(os.path.join(self.dir, INDEX_FILE)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a damaged index is rebuilt from the snapshot directories
        return data if isinstance(data, dict) else {}

    def _write_index(self, snapshots: dict) -> None:
        data = {"notebook": self.label, "snapshots": snapshots}
        path = os.path.join(self.dir, INDEX_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, validate_name(name))

    def entries(self) -> list[NotebookSnapshot]:
        """All snapshots, oldest first (directories are the truth; see the module docstring)."""
        indexed = self._read_index().get("snapshots") or {}
        out: list[NotebookSnapshot] = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for name in names:
            full = os.path.join(self.dir, name)
            if not NAME_RE.match(name) or not os.path.isfile(os.path.join(full, "metadata.json")):
                continue
            raw = indexed.get(name)
            if isinstance(raw, dict):
                try:
                    entry = NotebookSnapshot.from_json(name, raw)
                except TypeError:
                    entry = self._entry_from_metadata(name, full)
            else:
                entry = self._entry_from_metadata(name, full)
            entry.size_bytes = disk_usage(full)
            entry.group = self.key if self.foreign else None
            out.append(entry)
        out.sort(key=lambda e: (e.created, e.name))
        return out

    @staticmethod
    def _entry_from_metadata(name: str, full: str) -> NotebookSnapshot:
        try:
            with open(os.path.join(full, "metadata.json")) as f:
                meta = json.load(f)
            created = float(meta.get("created_unix_ms", 0)) / 1000.0
            kind = meta.get("kind")
        except (OSError, ValueError, TypeError, AttributeError):
            created, kind = os.path.getmtime(full), None
        return NotebookSnapshot(name=name, created=created or os.path.getmtime(full), kind=kind)

    def ref(self, name: str) -> str:
        return f"{self.key}/{name}" if self.foreign else name

    def get(self, name: str) -> NotebookSnapshot:
        validate_name(name)
        for e in self.entries():
            if e.name == name:
                return e
        raise StoreError(self.unknown_message(name))

    def latest(self) -> NotebookSnapshot:
        entries = self.entries()
        if not entries:
            if self.foreign:
                raise StoreError(f"group {self.key!r} has no snapshots; {OTHERS_HINT}")
            raise StoreError(f"this notebook has no snapshots yet ({self.label}); take one with "
                             f"`%snapshot [name]`; {OTHERS_HINT}")
        return entries[-1]

    def unknown_message(self, name: str) -> str:
        refs = [e.ref for e in self.entries()]
        asked = self.ref(name)
        if refs:
            return f"no snapshot named {asked!r}; available: {', '.join(refs)}; {OTHERS_HINT}"
        if self.foreign:
            return f"no snapshot named {asked!r}: group {self.key!r} has none; {OTHERS_HINT}"
        return (f"no snapshot named {asked!r}: this notebook has no snapshots yet; take one with "
                f"`%snapshot [name]`; {OTHERS_HINT}")

    def new_name(self) -> str:
        """The next free generated name: snap-1, snap-2, …"""
        used = set()
        with contextlib.suppress(FileNotFoundError):
            used = set(os.listdir(self.dir))
        n = 1 + max((int(m.group(1)) for u in used
                     if (m := re.fullmatch(re.escape(DEFAULT_PREFIX) + r"(\d+)", u))), default=0)
        return f"{DEFAULT_PREFIX}{n}"

    def reserve(self, name: str) -> str:
        """The path a new snapshot ``name`` is to be written to (its parent folder exists)."""
        path = self.path(name)
        if os.path.exists(path):
            raise StoreError(f"a snapshot named {name!r} already exists; choose another name, "
                             f"or replace it with %snapshot --force {name}")
        make_private_dirs(self.root, self.dir)
        return path

    def record(self, entry: NotebookSnapshot) -> None:
        with self._locked():
            snaps = self._read_index().get("snapshots") or {}
            snaps = {k: v for k, v in snaps.items()
                     if os.path.isdir(os.path.join(self.dir, k))}  # forget vanished ones
            snaps[entry.name] = entry.to_json()
            self._write_index(snaps)

    def delete(self, name: str) -> int:
        """Removes snapshot ``name``; returns the bytes freed."""
        path = self.path(name)
        if not os.path.isdir(path):
            raise StoreError(self.unknown_message(name))
        freed = disk_usage(path)
        with self._locked():
            # Rename first: a half-deleted snapshot never sits under its name.
            doomed = os.path.join(self.dir, f".deleting-{name}-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            snaps = self._read_index().get("snapshots") or {}
            snaps.pop(name, None)
            self._write_index(snaps)
            if not self.entries():  # the notebook's last snapshot: leave no empty folder behind
                for leftover in (INDEX_FILE, LOCK_FILE):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, leftover))
                with contextlib.suppress(OSError):
                    os.rmdir(self.dir)
        return freed

    def rename(self, name: str, new_name: str) -> None:
        """Renames snapshot ``name`` to ``new_name``; snapshots whose parent it was follow."""
        path, new_path = self.path(name), self.path(new_name)
        if not os.path.isdir(path):
            raise StoreError(self.unknown_message(name))
        with self._locked():
            if os.path.exists(new_path):
                raise StoreError(f"a snapshot named {new_name!r} already exists; choose another "
                                 f"name, or delete it first with %snapshot --delete {new_name}")
            os.rename(path, new_path)  # the runtime's files name each other relatively
            snaps = self._read_index().get("snapshots") or {}
            if name in snaps:
                snaps[new_name] = snaps.pop(name)
            for raw in snaps.values():
                if isinstance(raw, dict) and raw.get("parent") == name:
                    raw["parent"] = new_name
            self._write_index(snaps)

    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())


class SnapshotStore:
    """All notebooks' snapshot folders (groups) under one root."""

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = root or default_root()

    def notebook(self, key: str, label: str) -> NotebookSnapshots:
        return NotebookSnapshots(self.root, key, label)

    def groups(self, own: Optional[NotebookSnapshots] = None) -> list[NotebookSnapshots]:
        """Every group folder, labelled from its index; ``own`` itself where its key comes up,
        the others foreign."""
        try:
            keys = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [own if own is not None and key == own.key else self._group(key)
                for key in keys if GROUP_RE.match(key) and os.path.isdir(os.path.join(self.root, key))]

    def _group(self, key: str) -> NotebookSnapshots:
        nb = NotebookSnapshots(self.root, key, key, foreign=True)
        nb.label = str(nb._read_index().get("notebook") or key)
        return nb

    def group(self, key: str, own: NotebookSnapshots) -> NotebookSnapshots:
        """Group ``key`` (``own`` when it is the kernel's own); StoreError if there is none."""
        if key == own.key:
            return own
        if not GROUP_RE.match(key) or not os.path.isdir(os.path.join(self.root, key)):
            raise StoreError(f"there is no snapshot group {key!r}; `%snapshots --all` lists "
                             "every group with its snapshots")
        return self._group(key)

    def resolve(self, own: NotebookSnapshots, ref: Optional[str]) -> tuple[NotebookSnapshots, NotebookSnapshot]:
        """``NAME`` (in ``own``), ``GROUP/NAME``, ``GROUP/`` (its latest) or None (``own``'s
        latest) → (its group, the entry)."""
        if ref is None:
            return own, own.latest()
        if ref.endswith("/"):  # GROUP/: that group's latest
            nb = self.group(ref[:-1], own)
            return nb, nb.latest()
        key, name = split_ref(ref)
        nb = own if key is None else self.group(key, own)
        return nb, nb.get(name)

    def notebooks(self) -> list[tuple[str, str, int, int]]:
        """(key, label, snapshot count, bytes on disk) for every notebook folder."""
        return [(nb.key, nb.label, len(nb.entries()), disk_usage(nb.dir)) for nb in self.groups()]
