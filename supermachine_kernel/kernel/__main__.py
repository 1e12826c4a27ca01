"""The kernel process's entry point: `python -m supermachine_kernel.kernel -f CONNECTION_FILE`
(the kernelspec's argv). Runs the start-up sequence first (supermachine_kernel/startup: ports
listening, the VM restore started and the first kernel_info answered while ipykernel is still
being imported), then hands what it started to the kernel application."""
import sys

from supermachine_kernel.startup import begin

startup = begin(sys.argv[1:])

from supermachine_kernel.kernel.app import MicroVMKernelApp  # noqa: E402 - after start-up on purpose

MicroVMKernelApp.launch_instance(startup=startup)
