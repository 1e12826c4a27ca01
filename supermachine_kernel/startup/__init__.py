"""Start-up: the kernel process's first few hundred milliseconds, before ipykernel is imported.

`begin(argv)` listens on the shell and iopub ports (listeners.py), reads this command line's
launch hint and starts restoring its VM (hint.py, sequence.py), binds the two sockets with ZMQ
(sockets.py) and answers the frontend's first kernel_info from the hint (responder.py). It
returns the `Startup` that the kernel application takes over.

Only modules built into the interpreter are imported before the ports listen: each import on
this path delays the frontend's first answer.
"""
from .listeners import EarlyListeners

TYPE_CHECKING = False  # typing itself is not imported on this path; mypy reads this as typing's
if TYPE_CHECKING:
    from .sequence import Startup


def begin(argv: "list[str]") -> "Startup":
    listeners = EarlyListeners.listen(argv)
    # Imported once the ports listen: the frontend's connections are accepted meanwhile.
    from .sequence import Startup  # noqa: PLC0415
    from .sockets import EarlySockets  # noqa: PLC0415

    startup = Startup.begin(argv)
    startup.answer(EarlySockets.bind(argv, listeners))
    startup.prepare_attach()
    return startup
