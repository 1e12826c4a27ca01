"""`Prepared`: something made on a thread ahead of need, claimed once, released if unclaimed.

The kernel prepares VMs this way in three places, each with its own policy around it: the
warm snapshot restored at process start (startup/sequence.py, `EarlyVm`: taken only for the
same snapshot), restore-ahead for %restore (machine/restore_ahead.py, `Standby`: paused while
it waits, used only while the snapshot's files are unchanged), and the spare guest of a backend
without a snapshot pool (repl_client/backend.py, `SpareKeeper`: refilled after each take).

Imports only `threading` (built into the interpreter): start-up uses it before ipykernel loads.
"""
from __future__ import annotations

import threading

TYPE_CHECKING = False  # typing is not imported at run time (start-up path); mypy reads this
if TYPE_CHECKING:
    from typing import Any, Callable, Optional


class Prepared:
    """Runs `make()` on a daemon thread named `name`. `claim()` hands its result to one
    caller; `release()` gives up on it. Whatever is not claimed is passed to `dispose` (now,
    or as soon as `make()` returns), so it is never leaked. A failure of `make()` is kept in
    `error` and makes `claim()` return None."""

    def __init__(self, make: Callable[[], Any], dispose: Callable[[Any], None], name: str) -> None:
        self._make = make
        self._dispose = dispose
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result: Any = None
        self._claimed = False  # claimed or released: nobody else gets the result
        self.error: Optional[BaseException] = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            result = self._make()
        except BaseException as e:  # noqa: BLE001 - reported by claim() returning None
            self.error = e
            self._done.set()
            return
        with self._lock:
            self._result = result
            unwanted = self._claimed
        self._done.set()
        if unwanted:
            self._dispose(result)

    @property
    def done(self) -> bool:
        """`make()` has returned or failed."""
        return self._done.is_set()

    def claim(self, timeout: Optional[float] = None) -> Any:
        """The result, waiting up to `timeout` seconds (None: as long as it takes) for it; None
        when `make()` failed, it is not ready in time (it is then disposed of when it is), or it
        was claimed or released already."""
        self._done.wait(timeout)
        with self._lock:
            if self._claimed:
                return None
            self._claimed = True
            result, self._result = self._result, None
        return result

    def release(self) -> None:
        """Gives up on the result: disposed of now, or when `make()` returns. No-op once
        claimed."""
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
            result, self._result = self._result, None
        if result is not None:
            self._dispose(result)
