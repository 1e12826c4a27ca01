"""A small synchronous driver for one kernel process, used by the kernel tests."""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from typing import Any, Callable

from jupyter_client.manager import KernelManager


def _default_backend() -> str:
    """SUPERMACHINE_TEST_BACKEND if set; else `vm` when the runtime and QEMU are there."""
    chosen = os.environ.get("SUPERMACHINE_TEST_BACKEND")
    if chosen:
        return chosen
    try:
        import supermachine_kernel._core  # noqa: F401
    except ImportError:
        return "local"
    return "vm" if shutil.which("qemu-system-x86_64") else "local"


BACKEND = _default_backend()
KERNEL = "smk-test"
KERNEL_SIGNAL = "smk-test-signal"
# Generous on VMs: TCG runs Python 14-22x slower than the host.
SLOW = 8.0 if BACKEND == "vm" else 1.0
START_TIMEOUT = 300 if BACKEND == "vm" else 60


class LocalKernelspecs:
    """Kernelspecs a test module installs for itself, in a temporary prefix: name -> the
    kernel's extra arguments (after --MicroVMKernel.pool_min=0). `use()` puts them on
    JUPYTER_PATH, at the first kernel start rather than at collection."""

    def __init__(self, purpose: str, specs: dict[str, list[str]],
                 interrupt_mode: str = "message") -> None:
        from supermachine_kernel.cli.install import install

        root = tempfile.mkdtemp(prefix=f"smk-{purpose}-specs-")
        for name, extra in specs.items():
            install(prefix=root, kernel_name=name, backend=BACKEND, interrupt_mode=interrupt_mode,
                    display_name=f"Python (microVM, {BACKEND}, {purpose} tests)",
                    extra_args=["--MicroVMKernel.pool_min=0", *extra])
        self.path = os.path.join(root, "share", "jupyter")

    def use(self) -> None:
        paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
        if self.path not in paths:
            os.environ["JUPYTER_PATH"] = os.pathsep.join([self.path, *paths])


class Kernel:
    def __init__(self, name: str = KERNEL, extra_arguments: list[str] | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.km = KernelManager(kernel_name=name)
        kwargs: dict[str, Any] = {"extra_arguments": extra_arguments or []}
        if env is not None:
            kwargs["env"] = env
        if cwd is not None:  # the kernel's working directory (the notebook's, under Jupyter)
            kwargs["cwd"] = cwd
        self.km.start_kernel(**kwargs)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=START_TIMEOUT)
        self.flush()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)

    def flush(self) -> None:
        for channel in (self.kc.iopub_channel, self.kc.shell_channel, self.kc.stdin_channel):
            while True:
                try:
                    channel.get_msg(timeout=0.05)
                except queue.Empty:
                    break

    def execute(
        self,
        code: str,
        timeout: float = 30,
        allow_stdin: bool = False,
        on_input: Callable[[dict], str | None] | None = None,
        on_iopub: Callable[[dict], None] | None = None,
        **kw: Any,
    ) -> tuple[dict, list[dict]]:
        """Runs `code`; returns (execute_reply content, iopub messages for it until idle)."""
        timeout *= SLOW
        msg_id = self.kc.execute(code, allow_stdin=allow_stdin, **kw)
        deadline = time.monotonic() + timeout
        outputs: list[dict] = []
        reply = None
        idle = False
        while not (idle and reply is not None):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout:.0f} s: {code[:80]!r}; "
                                   f"outputs so far: {outputs[-5:]}")
            if on_input is not None:
                try:
                    req = self.kc.stdin_channel.get_msg(timeout=0.01)
                except queue.Empty:
                    pass
                else:
                    value = on_input(req)
                    if value is not None:
                        self.kc.input(value)
            try:
                msg = self.kc.iopub_channel.get_msg(timeout=0.05)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                if on_iopub is not None:
                    on_iopub(msg)
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                elif msg["msg_type"] != "execute_input":
                    outputs.append(msg)
            if reply is None:
                try:
                    shell = self.kc.shell_channel.get_msg(timeout=0.001)
                except queue.Empty:
                    pass
                else:
                    if shell["parent_header"].get("msg_id") == msg_id:
                        reply = shell["content"]
        return reply, outputs

    def reply(self, msg_id: str, timeout: float = 30) -> dict:
        """The content of the shell reply to request `msg_id` (other replies are dropped)."""
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            try:
                msg = self.kc.shell_channel.get_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]
        raise TimeoutError(f"no shell reply to {msg_id} in {timeout * SLOW:.0f} s")

    def value(self, expr: str, timeout: float = 30) -> str:
        """text/plain of evaluating `expr` in the guest."""
        reply, outputs = self.execute(expr, timeout=timeout)
        assert reply["status"] == "ok", reply
        for m in outputs:
            if m["msg_type"] == "execute_result":
                return m["content"]["data"]["text/plain"]
        raise AssertionError(f"no execute_result for {expr!r}: {outputs}")


def stdout_of(outputs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in outputs
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def stderr_of(outputs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in outputs
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
