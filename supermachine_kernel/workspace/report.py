"""The one message a user sees about what a sync left out (caps, symlinks, special files, bad
names, refused guest writes, conflicts), in words, with the setting that changes it.

    3 files were not copied to the VM: data/big.bin is 2.1 GB (limit 1 GB; raise it with
    c.MicroVMKernel.workspace_max_file_bytes); ...

The kernel shows it once per cell (in the cell's output, on stderr); `describe` is pure.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from .plan import Conflict
from .scan import Limits, Skipped

TRAIT = "c.MicroVMKernel."
SHOWN = 5   # items named per message; the rest are counted


def human_size(n: int) -> str:
    """Bytes in decimal units, as a file browser shows them: 512 B, 2.1 GB."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n_f = n / 1000.0
        if n_f < 1000 or unit == "PB":
            text = f"{n_f:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        n = int(n_f)
    raise AssertionError("unreachable")


def _why(s: Skipped, limits: Limits, first: bool) -> str:
    """Why `s` was left out; the limit and the setting that raises it only for the `first`
    item of its reason."""
    if s.reason == "file_size":
        hint = (f" (limit {human_size(limits.max_file_bytes)}; raise it with "
                f"{TRAIT}workspace_max_file_bytes)")
        return f"{s.path} is {human_size(s.size)}" + (hint if first else "")
    if s.reason == "total_bytes":
        hint = (f" the {human_size(limits.max_total_bytes)} workspace total (raise it with "
                f"{TRAIT}workspace_max_total_bytes)")
        return f"{s.path} would pass" + (hint if first else " it")
    if s.reason == "file_count":
        hint = (f" the {limits.max_files}-file limit (raise it with "
                f"{TRAIT}workspace_max_files)")
        return f"{s.path} is past" + (hint if first else " it")
    if s.reason == "symlink":
        return f"{s.path} is a symbolic link" + (" (links are never synced)" if first else "")
    if s.reason == "special":
        return f"{s.path} is not a regular file" + (" (FIFO, socket or device)" if first else "")
    if s.reason == "bad_name":
        return f"{s.path!r} has a name that cannot be synced safely"
    if s.reason == "unreadable":
        return f"{s.path} could not be read"
    return f"{s.path}: {s.reason}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe(skipped: Sequence[Skipped], limits: Limits, to_vm: bool,
             refused: Iterable[tuple[str, str]] = (),
             conflicts: Iterable[Conflict] = (), unlisted: int = 0,
             clashes: Sequence[str] = ()) -> str:
    """The message for one sync pass ('' when there is nothing to say). `to_vm` says which
    way it went; `refused` are (path, why) of guest writes the host writer refused;
    `unlisted` counts entries a cut-short guest listing did not even name; `clashes` are
    paths that are a file on one side and a directory on the other (left alone)."""
    lines = []
    if skipped or unlisted:
        where = "copied to the VM" if to_vm else "copied from the VM to the workspace"
        # The caps first (the user can act on them), each group in path order.
        order = {r: i for i, r in enumerate(("file_size", "total_bytes", "file_count"))}
        items = sorted(skipped, key=lambda s: (order.get(s.reason, 9), s.path))
        named = "; ".join(_why(s, limits, i == 0 or items[i - 1].reason != s.reason)
                          for i, s in enumerate(items[:SHOWN]))
        more = max(0, len(items) - SHOWN) + unlisted
        tail = f"; and {more} more" if more > 0 else ""
        count = len(items) + unlisted
        if not items:
            whose = "the workspace" if to_vm else "the VM's workspace"
            named = (f"{whose} holds more than {limits.max_files} files "
                     f"(raise the limit with {TRAIT}workspace_max_files)")
            tail = ""
        lines.append(f"{_plural(count, 'file')} {'was' if count == 1 else 'were'} "
                     f"not {where}: {named}{tail}.")
    refused = list(refused)
    if refused:
        named = "; ".join(f"{p} ({why})" for p, why in refused[:SHOWN])
        more = len(refused) - SHOWN
        tail = f"; and {more} more" if more > 0 else ""
        lines.append(f"The workspace refused {_plural(len(refused), 'write')} from the VM: "
                     f"{named}{tail}.")
    conflicts = list(conflicts)
    if conflicts:
        named = "; ".join(f"{c.path} -> {c.guest_copy}" for c in conflicts[:SHOWN])
        more = len(conflicts) - SHOWN
        tail = f"; and {more} more" if more > 0 else ""
        lines.append(f"{_plural(len(conflicts), 'file')} changed both in the workspace and in "
                     f"the VM: the workspace version was kept and the VM's saved beside it: "
                     f"{named}{tail}.")
    if clashes:
        named = "; ".join(clashes[:SHOWN])
        more = len(clashes) - SHOWN
        tail = f"; and {more} more" if more > 0 else ""
        one = len(clashes) == 1
        lines.append(f"{_plural(len(clashes), 'path')} {'is' if one else 'are'} a file on one "
                     f"side and a directory on the other, and {'was' if one else 'were'} left "
                     f"alone (rename one of them): {named}{tail}.")
    return "\n".join(lines)
