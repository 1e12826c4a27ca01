"""Progress of image builds and bakes in the terminal: bars on a TTY (tqdm), plain lines
otherwise (CI logs).

``Bars`` is the ``progress=`` callable of ``images.ensure_image`` / ``api.Image.build``: the
runtime (``core/runtime/src/image/tools.rs``) sends it events as dicts:

    {"event": "note", "text"}                     a line of information
    {"event": "start", "step"}                    a step of unknown length: a spinner
    {"event": "end", "step", "secs", "ok"}        that step ended
    {"event": "advance", "task", "done", "total", "unit"}
                                                  a counted task: pull (bytes of all layers),
                                                  download (bytes of one blob from a registry),
                                                  unpack (layers)

``spinner(label)`` wraps work the runtime reports nothing about (baking a snapshot).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Any, Dict, Iterator, Optional

from tqdm import tqdm

#: How often a spinner redraws its elapsed time.
TICK_S = 0.25
#: Tasks whose end gets no line of its own without a TTY (the runtime's notes already say it).
QUIET_TASKS = frozenset({"download"})


class Bars:
    """Draws the events of one build; ``label`` prefixes every line (``image default``)."""

    def __init__(self, label: str = "image", stream: Optional[IO[str]] = None,
                 tty: Optional[bool] = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bars: Dict[str, Any] = {}
        self._ticker: Optional[_Ticker] = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "note":
            self._line(event["text"])
        elif kind == "start":
            self._start(event["step"])
        elif kind == "end":
            self._end(event["step"], event["secs"], event["ok"])
        elif kind == "advance":
            self._advance(event["task"], event["done"], event["total"], event["unit"])

    def close(self) -> None:
        for key in list(self._bars):
            self._close(key)

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lines and bars ---------------------------------------------------------------------

    def _line(self, text: str) -> None:
        if self.tty:
            tqdm.write(f"[{self.label}] {text}", file=self.stream)
        else:
            print(f"[{self.label}] {text}", file=self.stream, flush=True)

    def _start(self, step: str) -> None:
        if not self.tty:
            self._line(f"{step} ...")
            return
        bar = tqdm(desc=f"[{self.label}] {step}", total=None, file=self.stream, leave=False,
                   bar_format="{desc} {elapsed}", dynamic_ncols=True)
        self._bars[f"step:{step}"] = bar
        self._tick()

    def _end(self, step: str, secs: float, ok: bool) -> None:
        self._close(f"step:{step}")
        self._line(f"{step} ... {secs:.1f} s" if ok else f"{step} ... failed after {secs:.1f} s")

    def _advance(self, task: str, done: int, total: int, unit: str) -> None:
        key = f"task:{task}"
        if not self.tty:
            if total and done >= total and task not in QUIET_TASKS:
                self._line(f"{task}: {_amount(done, unit)} done")
            return
        bar = self._bars.get(key)
        if bar is None:
            in_bytes = unit == "bytes"
            bar = tqdm(desc=f"[{self.label}] {task}", total=total or None, file=self.stream,
                       unit="B" if in_bytes else f" {unit}", unit_scale=in_bytes,
                       unit_divisor=1000, leave=False, dynamic_ncols=True)
            self._bars[key] = bar
        bar.total = total or None
        bar.n = done
        bar.refresh()
        if total and done >= total:
            self._close(key)
            if task not in QUIET_TASKS:
                self._line(f"{task}: {_amount(done, unit)} done")

    def _close(self, key: str) -> None:
        bar = self._bars.pop(key, None)
        if bar is not None:
            bar.close()
        if not any(k.startswith("step:") for k in self._bars) and self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    def _tick(self) -> None:
        if self._ticker is None:
            self._ticker = _Ticker(self)


class _Ticker(threading.Thread):
    """Redraws the open spinners so their elapsed time moves while the runtime works."""

    def __init__(self, bars: Bars) -> None:
        super().__init__(name="progress-ticker", daemon=True)
        self.bars = bars
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stop_event.wait(TICK_S):
            for key, bar in list(self.bars._bars.items()):
                if key.startswith("step:"):
                    with contextlib.suppress(Exception):
                        bar.refresh()

    def stop(self) -> None:
        self._stop_event.set()


def _amount(n: int, unit: str) -> str:
    if unit == "bytes":
        return f"{n / 1e6:.1f} MB"
    return f"{n} {unit}"


@contextlib.contextmanager
def spinner(what: str, label: str = "supermachine", stream: Optional[IO[str]] = None,
            tty: Optional[bool] = None) -> Iterator[None]:
    """Shows ``what`` with its elapsed time while the block runs (a line before and after when
    not on a TTY)."""
    bars = Bars(label, stream=stream, tty=tty)
    t = time.monotonic()
    bars({"event": "start", "step": what})
    ok = False
    try:
        yield
        ok = True
    finally:
        bars({"event": "end", "step": what, "secs": time.monotonic() - t, "ok": ok})
        bars.close()
