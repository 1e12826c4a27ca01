"""The Jupyter side of the kernel process: the "Python (microVM)" kernel and its application.

Run by `python -m supermachine_kernel.kernel -f CONNECTION_FILE` (__main__.py). Importing this
package imports nothing: the start-up sequence runs before ipykernel is loaded.

Where each message is handled (paths under supermachine_kernel/; `ipykernel/` is the base
class, which answers it unchanged). The first function is the one ipykernel dispatches to (or
the `do_*` hook its handler calls); after `->`, where the work is done.
tests/kernel/test_handler_map.py checks this map against the code.

Jupyter messages (shell, control and stdin channels):
    execute_request          kernel/microvm.py:MicroVMKernel.do_execute
    complete_request         kernel/microvm.py:MicroVMKernel.do_complete -> kernel/interrupt.py:GuestCalls.request
    inspect_request          kernel/microvm.py:MicroVMKernel.do_inspect -> kernel/interrupt.py:GuestCalls.request
    is_complete_request      kernel/microvm.py:MicroVMKernel.do_is_complete -> kernel/interrupt.py:GuestCalls.request
    history_request          kernel/microvm.py:MicroVMKernel.do_history -> kernel/interrupt.py:GuestCalls.request
    comm_open                kernel/microvm.py:MicroVMKernel.comm_open -> kernel/comms.py:CommRouter.handle
    comm_msg                 kernel/microvm.py:MicroVMKernel.comm_msg -> kernel/comms.py:CommRouter.handle
    comm_close               kernel/microvm.py:MicroVMKernel.comm_close -> kernel/comms.py:CommRouter.handle
    comm_info_request        kernel/microvm.py:MicroVMKernel.comm_info_request -> kernel/comms.py:CommRouter.comm_info
    input_reply              kernel/stdin.py:StdinRelay._await_input_reply
    interrupt_request        kernel/microvm.py:MicroVMKernel._send_interrupt_children -> kernel/interrupt.py:GuestCalls.interrupt
    kernel_info_request      kernel/microvm.py:MicroVMKernel.kernel_info_request -> kernel/kernel_info.py:build
    shutdown_request         kernel/microvm.py:MicroVMKernel.do_shutdown -> kernel/lifecycle.py:shutdown_guest
    connect_request          ipykernel/kernelbase.py:Kernel.connect_request
    usage_request            ipykernel/kernelbase.py:Kernel.usage_request
    debug_request            ipykernel/kernelbase.py:Kernel.debug_request
    create_subshell_request  ipykernel/kernelbase.py:Kernel.create_subshell_request
    delete_subshell_request  ipykernel/kernelbase.py:Kernel.delete_subshell_request
    list_subshell_request    ipykernel/kernelbase.py:Kernel.list_subshell_request

- A restart is shutdown_request with restart=true; jupyter_client then starts a new process.
- Interrupts in signal mode arrive as SIGINT: MicroVMKernel.start hands them to
  GuestCalls.interrupt too.
- The frontend's first kernel_info_request is usually answered before ipykernel is imported,
  by startup/responder.py:EarlyResponder, from the launch hint kernel/kernel_info.py wrote.
- No debugger and no subshells are advertised: debug_request fails, the subshell requests are
  refused.

UI channel requests (comm target supermachine.vm, from the JupyterLab extension in
labextension/; answered in the kernel process, never by the guest; each action runs its magic):
    refresh                  kernel/ui_channel.py:UiChannel._on_message -> kernel/ui_channel.py:UiChannel._send_state
    snapshot                 kernel/ui_channel.py:UiChannel._on_message -> magics/snapshot.py:magic
    restore                  kernel/ui_channel.py:UiChannel._on_message -> magics/restore.py:magic
    delete                   kernel/ui_channel.py:UiChannel._on_message -> magics/snapshot.py:magic
    rename                   kernel/ui_channel.py:UiChannel._on_message -> magics/snapshot.py:magic

Guest REPL frames (validated by repl_client/frames.py; died and invalid are made by the
client when the guest dies or sends a frame that fails validation):
    ready                    repl_client/client.py:_Link._on_loop
    reply                    repl_client/client.py:_Link._on_loop
    stream                   kernel/iopub.py:IopubRelay.on_guest_event
    display_data             kernel/iopub.py:IopubRelay.on_guest_event
    update_display_data      kernel/iopub.py:IopubRelay.on_guest_event
    execute_result           kernel/iopub.py:IopubRelay.on_guest_event
    clear_output             kernel/iopub.py:IopubRelay.on_guest_event
    error                    kernel/iopub.py:IopubRelay.on_guest_event
    comm_open                kernel/iopub.py:IopubRelay.on_guest_event
    comm_msg                 kernel/iopub.py:IopubRelay.on_guest_event
    comm_close               kernel/iopub.py:IopubRelay.on_guest_event
    input_request            kernel/iopub.py:IopubRelay.on_guest_event -> kernel/stdin.py:StdinRelay.forward
    died                     kernel/iopub.py:IopubRelay.on_guest_event
    invalid                  kernel/iopub.py:IopubRelay.on_guest_event

Host requests to the guest REPL (inside the VM; Driver.handle calls do_<type>):
    hello                    guest/repl.py:Driver.do_hello
    restored                 guest/repl.py:Driver.do_restored
    execute                  guest/repl.py:Driver.do_execute
    complete                 guest/repl.py:Driver.do_complete
    inspect                  guest/repl.py:Driver.do_inspect
    is_complete              guest/repl.py:Driver.do_is_complete
    history                  guest/repl.py:Driver.do_history
    comm_info                guest/repl.py:Driver.do_comm_info
    comm_open                guest/repl.py:Driver._comm
    comm_msg                 guest/repl.py:Driver._comm
    comm_close               guest/repl.py:Driver._comm
    workspace                guest/repl.py:Driver.do_workspace
    network                  guest/repl.py:Driver.do_network
    input_reply              guest/repl.py:Channel._read_loop
    shutdown                 guest/repl.py:Driver.serve
"""
