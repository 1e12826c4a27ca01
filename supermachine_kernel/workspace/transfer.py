"""How workspace bytes move between the host and the guest, through the guest agent.

The guest half is guest_side.py (stdlib only), run as one guest process per step:
`python3 -I -S -c GUEST_SOURCE list|apply|read ROOT ...` (its doc has the formats).

- The guest tree is listed by `list`: excludes applied while walking (a huge `.git` is never
  walked), symlinks never followed, at most `max_entries` entries (the rest counted in
  "unlisted"). Its stdout is read through `run_capped` (bytes and time capped, the process
  killed past either): the guest owns its root filesystem, so its "python3" may be anything.
- `parse_guest_listing` reads that output as hostile input, in the style of
  repl_client/frames.py: a byte cap before decoding, every field type- and range-checked,
  every path through `scan.check_relpath`, excludes applied again, entries whose parent is
  not a listed directory dropped, duplicates refused; then the same caps as the host tree
  (`scan.admit`). A listing that is cut short makes the scan incomplete, and an incomplete
  guest scan never deletes anything on the host (plan.py).
- host -> guest (`push`): one `apply` (deletes, then directories), then `Vm.upload` per file,
  then one `apply` that sets each copied file's mtime to the host's (so plan.next_state knows
  both signatures).
- guest -> host (`pull`): each file through the agent's limited read (`Vm.download` into
  the fd of `HostWriter.write`'s temp file: openat, O_NOFOLLOW, atomic) with
  `follow_symlinks=False` and `max_bytes` = the listed size: the agent opens it without
  blocking and sends it only if it is still a regular file (a FIFO, a device or a symlink to
  /dev/zero swapped in after the listing is an error, never a hang or an endless stream), at
  most the listed size crosses, and a file that grew or shrank since the listing is dropped
  ("changed while copied") and copied after the next cell. Agents in snapshots baked before
  the limited read (no "read_limits" in `agent_features`) get the older path: one `read`
  process streaming the files on its stdout, each as a header with its size, exactly that
  many bytes, and a status byte. Deletes go through `HostWriter.delete`. Conflicts save the
  guest's version under the conflict name.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .._core import GuestError
from .host_writer import HostWriter, Refused
from .plan import Plan
from .scan import (
    DIR,
    EXTRA_ENTRIES,
    FILE,
    BadPath,
    Entry,
    Limits,
    Scan,
    Skipped,
    admit,
    check_relpath,
    is_excluded,
)

MAX_LISTING_BYTES = 32 * 1024 * 1024
MAX_INT = 2 ** 63 - 1
GUEST_KINDS = (FILE, DIR, "symlink", "special")


class ListingError(ValueError):
    """A guest step's output is not what guest_side.py prints; the sync pass is skipped."""


class GuestVm(Protocol):
    """The part of api.Vm the transfer uses."""
    def spawn(self, argv: Any, **kw: Any) -> Any: ...
    def upload(self, host_path: Any, guest_path: str, mode: Any = None) -> int: ...
    def download(self, guest_path: str, host_path: Any, **kw: Any) -> int: ...


# The guest half (stdlib only), run as `python3 -I -S -c GUEST_SOURCE COMMAND ROOT ...`.
GUEST_SOURCE = (Path(__file__).resolve().parent / "guest_side.py").read_text()
GUEST = ["python3", "-I", "-S", "-c", GUEST_SOURCE]



def _kill_if_running(child: Any) -> None:
    """Ends a guest process that is still running (a capped or failed transfer)."""
    if child.poll() is None:
        try:
            child.signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone
            pass

def run_capped(vm: GuestVm, argv: list[str], cap: int, timeout: float,
               stdin: bytes = b"") -> tuple[int, bytes]:
    """Runs `argv` in the guest; (exit code, stdout). The guest's python3 or sh may be
    anything (the guest owns its root filesystem), so stdout is read at most `cap` bytes
    (`Vm.exec` would collect all of it in host memory) and the whole run is bounded by
    `timeout` seconds; past either the process is killed and ListingError raised. Unread
    stderr stays within the agent's per-process output window."""
    deadline = time.monotonic() + timeout
    child = vm.spawn(argv, timeout_ms=int(timeout * 1000))
    try:
        if stdin:
            child.write_stdin(stdin)
        child.close_stdin()
        out = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ListingError(f"the guest's {argv[0]} did not finish within {timeout:.0f} s")
            chunk = child.read_stdout(min(1 << 20, cap + 1 - len(out)), timeout=left)
            if not chunk:
                break
            out += chunk
            if len(out) > cap:
                raise ListingError(f"the guest's {argv[0]} wrote more than {cap} bytes")
        status = child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ListingError(f"the guest's {argv[0]} did not finish within {timeout:.0f} s") from None
    except ListingError:
        raise
    finally:
        _kill_if_running(child)
    return status.exit_code, bytes(out)


def list_guest(vm: GuestVm, guest_root: str, limits: Limits, timeout: float = 60.0) -> Scan:
    """The guest tree under `guest_root`, judged by `limits` (see parse_guest_listing)."""
    opt = {"excludes": list(limits.excludes), "hidden": limits.exclude_hidden_dirs,
           "max_entries": limits.max_files + EXTRA_ENTRIES}
    code, out = run_capped(vm, [*GUEST, "list", guest_root, json.dumps(opt)],
                           MAX_LISTING_BYTES, timeout)
    if code != 0:
        raise ListingError(f"listing the guest workspace failed (exit {code})")
    return parse_guest_listing(out, limits)


def _nonneg(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT:
        raise ListingError(f"{what} must be an integer in 0..2**63-1, got {v!r:.40}")
    return v


def parse_guest_listing(raw: bytes | Any, limits: Limits) -> Scan:
    """A guest listing (guest_side.py `list` output: bytes, or the object the guest REPL put
    into a size-capped reply frame) as a Scan, or ListingError when its shape is wrong.
    Entries with unacceptable names are skipped ("bad_name"), symlinks and special files
    skipped as such; the caps apply as to the host tree."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_LISTING_BYTES:
            raise ListingError(f"guest listing of {len(raw)} bytes exceeds {MAX_LISTING_BYTES}")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ListingError(f"guest listing is not UTF-8 JSON: {err}") from None
    else:
        doc = raw
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        raise ListingError(_printable(doc["error"]))
    if not isinstance(doc, dict) or doc.get("v") != 1 or not isinstance(doc.get("entries"), list):
        raise ListingError("guest listing is not an object with v=1 and a list 'entries'")
    unlisted = _nonneg(doc.get("unlisted", 0), "'unlisted'")
    rows = doc["entries"]
    cap = limits.max_files + EXTRA_ENTRIES
    if len(rows) > cap:
        unlisted += len(rows) - cap
        rows = rows[:cap]
    seen: dict[str, tuple[str, Entry]] = {}
    skipped: list[Skipped] = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 5:
            raise ListingError("a guest listing entry is not [path, kind, size, mtime_ns, mode]")
        path, kind = row[0], row[1]
        size = _nonneg(row[2], "size")
        mtime_ns = _nonneg(row[3], "mtime_ns")
        mode = _nonneg(row[4], "mode") & 0o777
        if not isinstance(path, str) or kind not in GUEST_KINDS:
            raise ListingError(f"a guest listing entry has path {path!r:.80} and kind {kind!r:.20}")
        if path in seen:
            raise ListingError(f"guest listing names {path!r:.200} twice")
        try:
            parts = check_relpath(path)
        except BadPath:
            skipped.append(Skipped(_printable(path), "bad_name"))
            seen[path] = ("bad", Entry(FILE, 0, 0, 0))
            continue
        if any(is_excluded(p, True, limits) for p in parts[:-1]) or \
                is_excluded(parts[-1], kind == DIR, limits):
            seen[path] = ("excluded", Entry(FILE, 0, 0, 0))
            continue
        seen[path] = (kind, Entry(kind if kind in (FILE, DIR) else FILE,
                                  size if kind == FILE else 0, mtime_ns, mode))
    listing: list[tuple[str, Entry]] = []
    for path, (kind, e) in seen.items():
        if kind in ("bad", "excluded"):
            continue
        parent = path.rpartition("/")[0]
        if parent and seen.get(parent, ("",))[0] != DIR:
            # Under something that is not a listed directory (a forged entry, or under a
            # symlink/excluded/bad name): never a path the host should write.
            if seen.get(parent, ("",))[0] not in ("bad", "excluded", "symlink", "special"):
                skipped.append(Skipped(path, "bad_name"))
            continue
        if kind in ("symlink", "special"):
            skipped.append(Skipped(path, kind))
        else:
            listing.append((path, e))
    out = admit(listing, limits, skipped)
    out.unlisted = unlisted
    return out


def _printable(path: str) -> str:
    return path.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:300]


@dataclass
class Outcome:
    """What a push or pull did: paths copied and deleted, (path, why) refusals."""
    copied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _guest_path(guest_root: str, rel: str) -> str:
    check_relpath(rel)
    return guest_root.rstrip("/") + "/" + rel


# Carries out guest_side.py's `apply` ops in the guest; returns its answer ({"failed": ...},
# unchecked) or raises ListingError. Default: a guest process (`apply_by_process`); the kernel
# passes one that asks its guest REPL, which has guest_side.py loaded (no process start).
Applier = Callable[[dict], Any]


def apply_by_process(vm: GuestVm, guest_root: str) -> Applier:
    def apply(ops: dict) -> Any:
        code, stdout = run_capped(vm, [*GUEST, "apply", guest_root],
                                  1_000_000, 60.0, stdin=json.dumps(ops).encode())
        if code != 0:
            raise ListingError(f"the guest could not apply the sync (exit {code})")
        try:
            return json.loads(stdout.decode("utf-8", "replace"))
        except ValueError:
            raise ListingError("the guest's answer to the sync was not understood") from None
    return apply


def _apply_in_guest(apply: Applier, ops: dict, out: Outcome) -> None:
    if not any(ops.values()):
        return
    try:
        answer = apply(ops)
    except ListingError as e:
        out.refused.append(("(guest)", str(e)))
        return
    try:
        failed = answer["failed"]
        for rel, why in failed[:100]:
            out.refused.append((str(rel)[:300], str(why)[:300]))
    except (ValueError, KeyError, TypeError):
        out.refused.append(("(guest)", "the guest's answer to the sync was not understood"))


def push(vm: GuestVm, host_root: str, guest_root: str, plan: Plan, host: Scan,
         apply: Applier | None = None) -> Outcome:
    """Carries out the host -> guest half of `plan`: guest deletes, directories, file copies
    (mode and mtime from the host scan). Conflicts' guest versions must be pulled first.
    `apply` runs guest_side.py's `apply` ops (default: a guest process)."""
    apply = apply or apply_by_process(vm, guest_root)
    out = Outcome()
    dirs = [p for p in plan.to_guest if host.entries[p].kind == DIR]
    files = [p for p in plan.to_guest if host.entries[p].kind == FILE]
    parents = sorted({p.rpartition("/")[0] for p in files if "/" in p} - set(dirs))
    _apply_in_guest(apply, {"delete": list(plan.delete_in_guest), "mkdir": dirs + parents},
                    out)
    out.deleted += plan.delete_in_guest
    times = []
    for p in files:
        e = host.entries[p]
        src = os.path.join(host_root, *p.split("/"))
        try:
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode):
                out.refused.append((p, "is no longer a regular file on the host"))
                continue
            vm.upload(src, _guest_path(guest_root, p), e.mode)
        except OSError as err:
            out.refused.append((p, f"cannot be read on the host: {err.strerror}"))
            continue
        except GuestError as err:
            # Full guest tmpfs (its writable layer is RAM), a directory in the way, ...
            out.refused.append((p, f"could not be written in the VM: {err}"))
            continue
        times.append([p, e.mtime_ns])
        out.copied.append(p)
    failed = {path for path, _ in out.refused}
    if "(guest)" not in failed:
        out.copied += [d for d in dirs if d not in failed]
    _apply_in_guest(apply, {"utime": times}, out)
    return out


MAX_HEADER_BYTES = 4096


class _GuestStream:
    """The stdout of a guest process, read with a deadline; every shortfall is ListingError."""

    def __init__(self, child: Any, deadline: float, what: str) -> None:
        self._child, self._deadline, self._what = child, deadline, what
        self._buf = bytearray()

    def read_some(self, n: int) -> bytes:
        if not self._buf:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise ListingError(f"{self._what} did not finish in time")
            try:
                chunk = self._child.read_stdout(1 << 20, timeout=left)
            except TimeoutError:
                raise ListingError(f"{self._what} did not finish in time") from None
            if not chunk:
                raise ListingError(f"{self._what} ended early")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += self.read_some(n - len(out))
        return bytes(out)


class _Changed(Exception):
    pass


class _Body:
    """One file's bytes in the stream, as a file-like source for HostWriter.write; its end
    checks the status byte (a file that shrank while read raises, and the writer drops it)."""

    def __init__(self, stream: _GuestStream, size: int) -> None:
        self._stream, self._left, self._ended = stream, size, False

    def read(self, n: int = -1) -> bytes:
        if self._left == 0:
            self._end()
            return b""
        data = self._stream.read_some(self._left if n < 0 else min(n, self._left))
        self._left -= len(data)
        return data

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._stream.read_exact(1) != b"\x00":
                raise _Changed()

    def finish(self) -> None:
        """Skips what the writer did not read (a refused write), so the stream stays in step."""
        while self._left:
            self._left -= len(self._stream.read_some(min(self._left, 1 << 20)))
        try:
            self._end()
        except _Changed:
            pass


def pull(vm: GuestVm, writer: HostWriter, guest_root: str, plan: Plan, guest: Scan,
         limits: Limits, timeout: float = 600.0) -> Outcome:
    """Carries out the guest -> host half of `plan`: conflict copies, directories, files and
    deletes, every write through `writer`. File bytes come through the agent's limited read
    (at most the listed size, regular files only, no symlink followed), or from a guest
    process running guest_side.py `read` when the agent predates that (see the module doc)."""
    out = Outcome()
    jobs: list[tuple[str, str, Entry]] = []      # (guest path, host path, listed entry)
    for c in plan.conflicts:
        e = guest.entries.get(c.path)
        if e is not None and e.kind == FILE:
            jobs.append((c.path, c.guest_copy, e))
    for p in plan.to_host:
        e = guest.entries[p]
        if e.kind == DIR:
            try:
                writer.mkdir(p, e.mode)
                out.copied.append(p)
            except Refused as err:
                out.refused.append((err.path, err.why))
        else:
            jobs.append((p, p, e))
    if jobs:
        copy = _download_files if FEATURE_READ_LIMITS in _agent_features(vm) else _read_files
        try:
            copy(vm, writer, guest_root, jobs, limits, timeout, out)
        except ListingError as err:
            done = set(out.copied) | {p for p, _ in out.refused}
            out.refused += [(dest, f"could not be copied from the VM: {err}")
                            for _, dest, _ in jobs if dest not in done]
    for p in plan.delete_on_host:
        try:
            if writer.delete(p):
                out.deleted.append(p)
        except Refused as err:
            out.refused.append((err.path, err.why))
    return out


FEATURE_READ_LIMITS = "read_limits"
CHANGED = "changed in the VM while it was copied; it is copied again after the next cell"


def _agent_features(vm: GuestVm) -> list[str]:
    features = getattr(vm, "agent_features", None)
    return features if isinstance(features, list) else []


# Limited reads in flight at once: one read is a round trip plus a thread start in the agent
# (measured under TCG: 6.8 ms per small file one at a time, 1.75 ms with 4 in flight).
PARALLEL_READS = 4


def _download_files(vm: GuestVm, writer: HostWriter, guest_root: str,
                    jobs: list[tuple[str, str, Entry]], limits: Limits, timeout: float,
                    out: Outcome) -> None:
    """Each file by the agent's limited read, straight into the writer's temp file
    (PARALLEL_READS at once; the outcome lists them in job order)."""
    deadline = time.monotonic() + timeout

    def one(job: tuple[str, str, Entry]) -> tuple[str, str | None]:
        """(host path, None if copied else why not); raises ListingError past the deadline."""
        rel, dest, e = job
        src = _guest_path(guest_root, rel)
        left = deadline - time.monotonic()
        if left <= 0:
            raise ListingError(f"copying files from the VM did not finish within {timeout:.0f} s")
        size = min(e.size, limits.max_file_bytes)

        def fill(fd: int) -> int:
            n: int = vm.download(src, fd, max_bytes=size, follow_symlinks=False, timeout=left)
            if n != size:
                raise _Changed()
            return n

        try:
            writer.write(dest, fill, e.mode, mtime_ns=e.mtime_ns, max_bytes=size)
            return dest, None
        except Refused as err:
            return err.path, err.why
        except _Changed:
            return dest, CHANGED
        except TimeoutError:
            raise ListingError(f"copying files from the VM did not finish within "
                               f"{timeout:.0f} s") from None
        except GuestError as err:
            if getattr(err, "kind", None) == "limit":
                return dest, CHANGED                    # it grew after it was listed
            return dest, f"could not be read in the VM: {str(err)[:300]}"

    def record(result: tuple[str, str | None]) -> None:
        path, why = result
        if why is None:
            out.copied.append(path)
        else:
            out.refused.append((path, why))

    if len(jobs) == 1:
        record(one(jobs[0]))
        return
    with ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix="workspace-pull") as pool:
        futures = [pool.submit(one, job) for job in jobs]
        try:
            for f in futures:
                record(f.result())
        finally:
            for f in futures:
                f.cancel()


def _read_files(vm: GuestVm, writer: HostWriter, guest_root: str,
                jobs: list[tuple[str, str, Entry]], limits: Limits, timeout: float,
                out: Outcome) -> None:
    for rel, _, _ in jobs:
        check_relpath(rel)
    wanted = json.dumps([[rel, limits.max_file_bytes] for rel, _, _ in jobs]).encode()
    child = vm.spawn([*GUEST, "read", guest_root],
                     timeout_ms=int(timeout * 1000))
    try:
        child.write_stdin(wanted)
        child.close_stdin()
        stream = _GuestStream(child, time.monotonic() + timeout, "reading files in the VM")
        for rel, dest, e in jobs:
            (n,) = struct.unpack(">I", stream.read_exact(4))
            if n > MAX_HEADER_BYTES:
                raise ListingError(f"a file header of {n} bytes from the VM")
            try:
                head = json.loads(stream.read_exact(n).decode("utf-8"))
                size = head.get("size") if isinstance(head, dict) else None
                error = head.get("error") if isinstance(head, dict) else None
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise ListingError("a file header from the VM is not UTF-8 JSON") from None
            if error is not None:
                out.refused.append((dest, f"could not be read in the VM: {str(error)[:200]}"))
                continue
            size = _nonneg(size, "size")
            if size > limits.max_file_bytes:
                raise ListingError(f"the VM announced {size} bytes for {rel!r:.100} past the "
                                   f"{limits.max_file_bytes}-byte limit")
            mode = _nonneg(head.get("mode", 0o644), "mode") & 0o777
            body = _Body(stream, size)
            try:
                writer.write(dest, body, mode, mtime_ns=e.mtime_ns, max_bytes=size)
                out.copied.append(dest)
            except Refused as err:
                out.refused.append((err.path, err.why))
            except _Changed:
                out.refused.append((dest, CHANGED))
            body.finish()
    finally:
        _kill_if_running(child)


__all__ = [
    "GUEST_SOURCE",
    "ListingError",
    "Outcome",
    "list_guest",
    "parse_guest_listing",
    "pull",
    "push",
]
