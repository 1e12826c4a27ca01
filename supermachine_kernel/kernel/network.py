"""The kernel's network egress (issue 13 part 2): the one `_core.NetProxy` per kernel that
enforces `c.MicroVMKernel.allow_network`, its attachment to every VM the kernel's guest runs
on, the guest REPL's proxy environment, and the refusals a cell caused, shown after it.

When `allow_network` is empty (the default) there is no proxy and no listener in the guest:
the guest has no network at all. Its REPL is still sent an empty environment after each
attach (`forget_policy`): a REPL restored from a snapshot taken under a policy then drops the
proxy variables that policy set, which would point at a proxy that is not there.

Path of a guest connection (docs/issue13-network.md): a program in the guest connects to
127.0.0.1:3128 (the proxy variables point there) -> the guest agent's listener there
(`Vm.forward_to_host(3128, proxy.port)`) -> the agent channel -> the runtime connects to the
kernel's NetProxy on the host's 127.0.0.1 -> the checked destination. With the local backend
(a host process, not isolated) the REPL is given the proxy's own address instead.

Every guest the kernel's `GuestRepl` launches or adopts (first start, restart after a death,
pool hand-out, %restore, restore-ahead) passes through `NetworkHook.attach` before any request
reaches it: the forward is (re-)made on its VM and the REPL is sent the environment (its process
may come from a snapshot baked before this kernel, and with another proxy port, existed).
"""
from __future__ import annotations

import atexit
import logging
import threading
import typing as t

log = logging.getLogger("supermachine_kernel.kernel.network")

#: The guest's end of the forward. Fixed: the environment of a REPL in a snapshot keeps it.
GUEST_PROXY_PORT = 3128
GUEST_PROXY_URL = f"http://127.0.0.1:{GUEST_PROXY_PORT}"
#: The guest's own servers stay direct.
NO_PROXY = "localhost,127.0.0.1,::1"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

#: The guest request that sets the REPL's environment (guest/repl.py:Driver.do_network).
NETWORK_REQUEST = "network"
#: Largest CA bundle sent to the guest (Debian's whole bundle is ~220 KB).
MAX_CA_BYTES = 1024 * 1024


class NetworkError(RuntimeError):
    """The kernel's network could not be set up; the message says why and what to do."""


def proxy_environment(url: str = GUEST_PROXY_URL) -> dict[str, str]:
    """The variables pip, requests, urllib and curl read (curl reads `http_proxy` only in
    lowercase; urllib3 alone reads none of them)."""
    env = {}
    for name in PROXY_VARIABLES:
        env[name] = env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    return env


def read_ca_certificates(path: str) -> str:
    """The PEM text of `path` for the guest's trust store (c.MicroVMKernel.
    network_ca_certificates): certificates only, at most MAX_CA_BYTES. Raises NetworkError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_BYTES + 1)
    except OSError as e:
        raise NetworkError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_CA_BYTES:
        raise NetworkError(f"{path} is over {MAX_CA_BYTES // 1024} KiB; give a CA bundle")
    text = data.decode("ascii", "replace")
    if "PRIVATE KEY" in text:
        raise NetworkError(f"{path} holds a private key; it must hold CA certificates only "
                           "(they are copied into the guest)")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise NetworkError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return text


def describe_refusals(messages: list[str], dropped: int) -> str:
    """What the cell shows: each distinct refusal once, with how often it happened."""
    counts: dict[str, int] = {}
    for m in messages:
        counts[m] = counts.get(m, 0) + 1
    lines = [m + (f" ({n} connections)" if n > 1 else "") for m, n in counts.items()]
    if dropped:
        lines.append(f"(and {dropped} more refused connections)")
    return "".join(f"[network] {line}\n" for line in lines)


class NetworkHook:
    """One per kernel with a non-empty policy: owns the proxy, attaches each new guest to it,
    and hands out what the cell should show about refused connections."""

    def __init__(self, allow: list[str], *, max_connections: int, bandwidth: int | None,
                 ca_certificates: str | None = None,
                 proxy_factory: t.Callable[..., t.Any] | None = None) -> None:
        #: PEM text the guest trusts instead of its own CAs (None: its own).
        self.ca = ca_certificates
        if proxy_factory is None:
            from .. import _core  # noqa: PLC0415 - the compiled runtime, only with a policy

            proxy_factory = _core.NetProxy
        try:
            self.proxy = proxy_factory(list(allow), max_connections=max_connections,
                                       bandwidth=bandwidth)
        except (OSError, ValueError) as e:
            raise NetworkError(f"the kernel's network proxy did not start: {e}") from e
        self._problems: list[str] = []
        self._lock = threading.Lock()

    # -- a new guest (GuestRepl.attach_hooks; a worker thread, blocking calls allowed) ----------

    def attach(self, handle: t.Any) -> list[dict[str, t.Any]]:
        """Connects the guest of `handle` to this kernel's proxy and returns the frame that
        sets the REPL's environment. A VM whose agent cannot forward gets no environment (its
        programs then fail at once instead of waiting on a listener that is not there), and the
        next cell says why."""
        vm = getattr(handle, "vm", None)
        if vm is None:  # the local backend: the REPL is a host process, the proxy is reachable
            return [self._request(proxy_environment(self.proxy.url))]
        try:
            vm.forward_to_host(GUEST_PROXY_PORT, self.proxy.port)
        except AttributeError:
            self._problem("this kernel's VM runtime cannot forward guest connections to the host "
                          "(rebuild the project: `make .venv/.stamps/build`)")
            return forget_policy(handle)
        except Exception as e:  # noqa: BLE001 - VmError, GuestError from an older agent
            log.warning("network forward failed on %s: %s", getattr(vm, "id", "?"), e)
            self._problem(f"the guest could not be connected to the kernel's network proxy ({e}); "
                          "if this VM comes from a snapshot taken by an older agent, rebake it "
                          "with `supermachine-kernel prepare`")
            return forget_policy(handle)
        return [self._request(proxy_environment())]

    def _request(self, env: dict[str, str]) -> dict[str, t.Any]:
        request: dict[str, t.Any] = {"type": NETWORK_REQUEST, "env": env}
        if self.ca is not None:
            request["ca"] = self.ca
        return request

    def _problem(self, text: str) -> None:
        with self._lock:
            self._problems.append(f"this cell's guest has no network: {text}")

    # -- after each cell -------------------------------------------------------------------------

    def take_report(self) -> str:
        """Text for the cell's stderr (empty when there is nothing to say): problems attaching
        the guest, and the connections the policy refused since the last cell."""
        with self._lock:
            problems, self._problems = self._problems, []
        messages, dropped = self.proxy.take_refusals()
        return "".join(f"[network] {p}\n" for p in problems) + describe_refusals(messages, dropped)

    def close(self) -> None:
        self.proxy.close()


def forget_policy(handle: t.Any) -> list[dict[str, t.Any]]:
    """The frame an attached guest gets when it has no network: an empty environment, so
    its REPL drops the variables an earlier policy set (guest/repl.py:set_network)."""
    return [{"type": NETWORK_REQUEST, "env": {}}]


def start(kernel: t.Any) -> NetworkHook | None:
    """The kernel's network, from its configuration (None when `allow_network` is empty):
    the proxy starts now and every guest the kernel's `GuestRepl` attaches is connected to it;
    without a policy, each is told it has none (`forget_policy`).
    Called once from MicroVMKernel.start, before the first guest starts."""
    if not kernel.allow_network:
        kernel.guest.attach_hooks.append(forget_policy)
        return None
    ca_path = getattr(kernel, "network_ca_certificates", "")
    hook = NetworkHook(kernel.allow_network, max_connections=kernel.network_max_connections,
                       bandwidth=kernel.network_bandwidth or None,
                       ca_certificates=read_ca_certificates(ca_path) if ca_path else None)
    kernel.guest.attach_hooks.append(hook.attach)
    atexit.register(hook.close)
    log.info("network: proxy on 127.0.0.1:%d for %s", hook.proxy.port, kernel.allow_network)
    return hook


def report(hook: NetworkHook, iopub: t.Any) -> None:
    """After a cell: what `take_report` has, on the cell's stderr."""
    text = hook.take_report()
    if text:
        iopub.publish("stream", {"name": "stderr", "text": text})
