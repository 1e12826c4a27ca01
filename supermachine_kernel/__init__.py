"""supermachine-kernel: run Python in snapshot-restored microVMs, from Python and from Jupyter."""
from __future__ import annotations

# typing.TYPE_CHECKING without importing typing: the kernel's start-up path imports this package
# before anything else and must stay on builtins.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__version__ = "0.1.0"


def env_switch(env: Mapping[str, str], name: str) -> bool:
    """An on/off switch in the environment mapping `env`: on unless `name` is 0, no, off or
    false (any case); on when unset."""
    return env.get(name, "1").strip().lower() not in ("0", "no", "off", "false")


# The VM API (``supermachine_kernel.api``) is re-exported lazily, so importing the package (e.g.
# for the kernelspec installer) does not load the compiled runtime.
_API_NAMES = frozenset(
    {
        "Image", "Vm", "ExecChild", "ExecResult", "ExitStatus", "VmError", "VmDiedError",
        "VmReleasedError", "ProtocolError", "GuestError", "AcceleratorError", "QemuNotFoundError",
        "ImageNotFoundError", "ImageError",
    }
)


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'supermachine_kernel' has no attribute {name!r}")
