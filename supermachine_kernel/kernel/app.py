"""The kernel application: IPKernelApp running MicroVMKernel on the sockets start-up bound.

`MicroVMKernelApp` takes the `Startup` the entry module ran (supermachine_kernel/startup) as its
`startup` trait: it adopts the shell and iopub sockets bound in the process's first
milliseconds, ends the early responder before the sockets change hands, and hands the startup
to the kernel. It sets up the process's logging; its exit is lifecycle.py's `exit_process`.
"""
from __future__ import annotations

import atexit
import logging
import os
import typing as t

import zmq
from ipykernel.iostream import IOPubThread
from ipykernel.kernelapp import IPKernelApp
from jupyter_core.paths import jupyter_config_path
from traitlets import Any, default

from . import lifecycle
from .microvm import MicroVMKernel


class MicroVMKernelApp(IPKernelApp):
    """IPKernelApp running MicroVMKernel, configured from Jupyter's config dirs."""

    name = "supermachine-kernel"
    startup = Any(None, help="The start-up sequence the entry module ran (__main__.py), if any.")

    @default("kernel_class")
    def _kernel_class_default(self) -> type:
        return MicroVMKernel

    @default("config_file_paths")
    def _config_file_paths_default(self) -> list[str]:
        return list(jupyter_config_path())

    def init_sockets(self) -> None:
        # The early responder (if any) stops before the sockets change hands.
        startup = self.startup
        if startup is not None:
            startup.stop_responder()
        early = startup.sockets if startup is not None else None
        if early is None or not early.matches(self):
            if early is not None:
                early.close()
            self._early_iopub = None
            return super().init_sockets()
        # IPKernelApp.init_sockets, with the shell socket (and in init_iopub the iopub socket)
        # bound at process start.
        self.log.info("Starting the kernel at pid: %i", os.getpid())
        self.context = context = early.context
        atexit.register(self.close)
        if self.curve_secretkey is not None:  # as IPKernelApp.init_sockets says it
            self.log.info("Detected CurveZMQ secret key; using transport encryption")
        elif self.transport == "tcp":
            self.log.warning(
                "Kernel is running over TCP without encryption. All communication (including "
                "code and outputs) is sent in plain text and is susceptible to eavesdropping. "
                "Use IPC transport or launch with kernel manager-provisioned CurveZMQ keys to "
                "enable transport encryption."
            )
        self.shell_socket = early.shell
        self.log.debug("shell ROUTER Channel on port: %i (bound at start)", self.shell_port)
        self.stdin_socket = context.socket(zmq.ROUTER)
        self.stdin_socket.linger = 1000
        self._apply_curve_server_options(self.stdin_socket)
        self.stdin_port = self._bind_socket(self.stdin_socket, self.stdin_port)
        self.log.debug("stdin ROUTER Channel on port: %i", self.stdin_port)
        if hasattr(zmq, "ROUTER_HANDOVER"):
            self.shell_socket.router_handover = self.stdin_socket.router_handover = 1
        self._early_iopub = early.iopub
        self.init_control(context)
        self.init_iopub(context)

    def init_kernel(self) -> None:
        super().init_kernel()
        self.kernel.startup = self.startup

    def init_control(self, context: t.Any) -> None:
        super().init_control(context)
        # No subshells here (the guest runs one request at a time; kernel_info says so). Without
        # ipykernel 7's shell-channel thread, shell requests are read by the main thread itself
        # instead of relayed to it, and the replies back, through inproc sockets (~0.2 ms).
        self.shell_channel_thread = None

    def init_iopub(self, context: t.Any) -> None:
        iopub, self._early_iopub = getattr(self, "_early_iopub", None), None
        if iopub is None:
            return super().init_iopub(context)
        # IPKernelApp.init_iopub, with the socket bound at process start.
        self.iopub_socket = iopub
        self.log.debug("iopub PUB Channel on port: %i (bound at start)", self.iopub_port)
        self.configure_tornado_logger()
        self.iopub_thread = IOPubThread(self.iopub_socket, pipe=True, session=self.session)
        self.iopub_thread.start()
        self.iopub_socket = self.iopub_thread.background_socket

    def start(self) -> None:
        try:
            super().start()
        finally:
            kernel = getattr(self, "kernel", None)
            lifecycle.exit_process(getattr(self, "control_thread", None),
                                   getattr(kernel, "_shutdown_message", None) is not None)

    @default("capture_fd_output")
    def _capture_fd_output_default(self) -> bool:
        return False  # the host process's own fds are not user output: that is in the guest

    def _configure_logging(self) -> None:
        super()._configure_logging()
        # traitlets sets the app's logger to DEBUG and filters in its handler, so each of the
        # five log.debug() calls ipykernel makes per request would build a LogRecord only to
        # drop it. The logger starts at its handlers' lowest level instead; a lower log_level
        # (e.g. --debug) lowers that too.
        raise_to_handler_level(logging.getLogger(self.__class__.__name__))
        # The package's module loggers (repl_client, machine, limits, ...) write to the app's
        # handlers, i.e. the process's real stderr, the kernel log. With no handler of their
        # own, Python's last-resort handler printed their warnings to sys.stderr, which here is
        # ipykernel's IOPub stream: a frontend got them with no parent (so in no cell's output)
        # and the kernel log never had them.
        package = logging.getLogger("supermachine_kernel")
        for handler in self.log.handlers:
            if handler not in package.handlers:
                package.addHandler(handler)

    @default("outstream_class")
    def _outstream_class_default(self) -> str:
        return "supermachine_kernel.kernel.host_streams.HostOutStream"  # flushes only what it holds


def raise_to_handler_level(log: logging.Logger) -> None:
    """Sets `log`'s level to the lowest level of the handlers its records reach, if that is
    higher: a record none of them would emit is then not built at all."""
    levels = []
    current: logging.Logger | None = log
    while current is not None:
        levels += [handler.level for handler in current.handlers]
        if not current.propagate:
            break
        current = current.parent
    lowest = min(levels) if levels else logging.lastResort.level if logging.lastResort else 0
    if lowest > log.getEffectiveLevel():
        log.setLevel(lowest)

