"""Progress reporting: one small hook that the pipeline calls and that the flows and the CLI listen to.

The pipeline reports `(stage, done, total)` from inside a stage (a block of sequential compression, a
window of evaluation) through `report()`. It knows nothing of Prefect or terminals, and with nobody
listening a report costs one empty loop, so library callers and unit tests pay nothing.

A flow wraps its run in a `RunProgress`: it says which stage runs now (`run.stage(...)`), turns the
pipeline's reports into one run-wide percentage, writes it to a Prefect progress artifact and forwards
labelled updates to the displays registered with `display()` (the CLI's stderr bar). Stages the pipeline
does not report from (calibrate, pack, publish, or any stage served from the cache) simply complete when
their task returns.

Listeners are process-wide, not thread-local, because Prefect runs tasks in worker threads of the flow's
process. A listener that raises is dropped from that report: progress must never fail a compression run.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

Listener = Callable[[str, int, int], None]          # (stage, done, total)
Display = Callable[[str, int, int, float], None]    # (label, done, total, run percent 0..100)

_listeners: list[Listener] = []
_displays: list[Display] = []
_lock = threading.Lock()


def report(stage: str, done: int, total: int) -> None:
    """Called by the pipeline: `done` of `total` units of `stage` are finished."""
    for fn in list(_listeners):
        try:
            fn(stage, done, total)
        except Exception:  # noqa: BLE001 - a broken listener must not break the computation
            log.debug("progress listener failed", exc_info=True)


@contextlib.contextmanager
def _registered(registry: list, fn) -> Iterator[None]:
    with _lock:
        registry.append(fn)
    try:
        yield
    finally:
        with _lock:
            registry.remove(fn)


def listen(fn: Listener):
    """Context manager: `fn` receives every `report()` made while it is open."""
    return _registered(_listeners, fn)


def display(fn: Display):
    """Context manager: `fn` receives every flow's labelled, run-wide progress while it is open."""
    return _registered(_displays, fn)


class RunProgress:
    """Run-wide progress of one flow run over weighted stages.

    `stages` is [(label, weight)] in run order; `stage(label)` makes a stage current (and completes the
    ones before it), pipeline reports move inside it, `done()` finishes the run at 100 %. `sink(percent)`
    (the Prefect artifact) is called at most every `min_interval` seconds, and always at 0 and 100.
    """

    def __init__(self, stages: Sequence[tuple[str, float]], sink: Callable[[float], None] | None = None,
                 min_interval: float = 1.0):
        total = sum(w for _, w in stages) or 1.0
        self._start: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        acc = 0.0
        for label, w in stages:
            self._start[label], self._weight[label] = acc / total, w / total
            acc += w
        self._sink, self._min_interval = sink, min_interval
        self._current: str | None = None
        self._percent = 0.0
        self._last_sent = -1.0
        self._lock = threading.Lock()
        self._listening = listen(self._on_report)

    def __enter__(self) -> "RunProgress":
        self._listening.__enter__()
        self._send(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self._listening.__exit__(*exc)

    @property
    def percent(self) -> float:
        return self._percent

    def stage(self, label: str) -> None:
        """`label` starts now; every earlier stage counts as finished."""
        self._current = label
        self._move(label, 0, 1)

    def finish(self, label: str | None = None) -> None:
        """The current stage (or `label`) is finished."""
        self._move(label or self._current, 1, 1)

    def done(self) -> None:
        with self._lock:
            self._percent = 100.0
        self._send(force=True)
        self._show(self._current or "done", 1, 1)

    def _on_report(self, stage: str, done: int, total: int) -> None:
        # The pipeline says "compress" or "evaluate"; the flow knows which such stage runs now.
        if self._current is not None and self._current.split()[0] == stage:
            self._move(self._current, done, total)

    def _move(self, label: str | None, done: int, total: int) -> None:
        if label not in self._start:
            return
        frac = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
        with self._lock:
            # Never backwards: a resumed stage may report from where its checkpoint left off.
            self._percent = max(self._percent, round(100.0 * (self._start[label] + self._weight[label] * frac), 2))
        self._send()
        self._show(label, done, total)

    def _show(self, label: str, done: int, total: int) -> None:
        for fn in list(_displays):
            try:
                fn(label, done, total, self._percent)
            except Exception:  # noqa: BLE001
                log.debug("progress display failed", exc_info=True)

    def _send(self, force: bool = False) -> None:
        if self._sink is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and (now - self._last_sent < self._min_interval or self._percent >= 100.0):
                return
            self._last_sent, percent = now, self._percent
        try:
            self._sink(percent)
        except Exception:  # noqa: BLE001 - an unreachable API must not fail the run
            log.warning("could not update the progress artifact", exc_info=True)


class TerminalBar:
    """A one-line progress bar on a text stream (the CLI's stderr), redrawn in place with '\\r'; a new line
    when the stage changes, so the finished stages stay visible above the running one."""

    def __init__(self, stream, width: int = 28):
        self.stream, self.width = stream, width
        self._label: str | None = None
        self._lock = threading.Lock()

    def __call__(self, label: str, done: int, total: int, percent: float) -> None:
        with self._lock:
            if self._label is not None and label != self._label:
                self.stream.write("\n")
            self._label = label
            frac = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
            filled = int(round(frac * self.width))
            self.stream.write(f"\r{label:<24.24} [{'#' * filled}{'.' * (self.width - filled)}] "
                              f"{done}/{total}  run {percent:5.1f}%")
            if percent >= 100.0:  # the run is over: end the line before the command prints its results
                self.stream.write("\n")
                self._label = None
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._label is not None:
                self.stream.write("\n")
                self.stream.flush()
            self._label = None


@contextlib.contextmanager
def terminal_bar(stream, enabled: bool | None = None) -> Iterator[None]:
    """Show flows' progress on `stream` while open. `enabled=None`: only when `stream` is a terminal."""
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    if not enabled:
        yield
        return
    bar = TerminalBar(stream)
    try:
        with display(bar):
            yield
    finally:
        bar.close()
