"""Progress reporting: one small hook that the pipeline calls and that the flows and the CLI listen to.

The pipeline reports `(stage, done, total)` from inside a stage (a block of sequential compression, a
window of evaluation) through `report()`. It knows nothing of Prefect or terminals, and with nobody
listening a report costs one empty loop, so library callers and unit tests pay nothing.

A flow wraps its run in a `RunProgress`: it says which stage runs now (`run.stage(...)`), turns the
pipeline's reports into one run-wide percentage, writes it to a Prefect progress artifact and forwards
labelled updates to the displays registered with `display()` (the CLI's stderr bar: `TerminalBar`, rich
rows with per-stage and run-wide ETA that library warnings and logs print above, never into). Stages the pipeline
does not report from (calibrate, pack, publish, or any stage served from the cache) simply complete when
their task returns.

Listeners are process-wide, not thread-local, because Prefect runs tasks in worker threads of the flow's
process. A listener that raises is dropped from that report: progress must never fail a compression run.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

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
    """The flows' progress on a terminal stream (the CLI's stderr), drawn by rich: a run-wide row and the
    current stage's row, each with its ETA (rich's estimate from the recent rate of progress); a finished
    stage leaves one line above them. The live rows stop at 100 % so the command's results print below.

    While the rows are shown, whatever else would write to the terminal goes *above* them instead of into
    a row: sys.stderr (Python warnings, stray prints) through rich's redirect, sys.stdout too when it is
    the terminal (never when piped: `--json` output must stay on stdout), and logging handlers that hold
    the terminal stream (transformers' and Prefect's, created at import with the real stderr) are pointed
    at the redirect until the rows stop. `get_time` and `force_terminal` exist for tests.
    """

    def __init__(self, stream, width: int = 28, force_terminal: bool | None = None, get_time=None,
                 console_width: int | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.stream = stream
        self.console = Console(file=stream, force_terminal=force_terminal, width=console_width,
                               highlight=False, soft_wrap=False)
        stdout_tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
        self._progress = Progress(
            TextColumn("{task.description:<24.24}"), BarColumn(bar_width=width), TextColumn("{task.fields[count]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console, redirect_stderr=True,
            redirect_stdout=stdout_tty and stream is not sys.stdout, get_time=get_time, auto_refresh=False)
        self._label: str | None = None
        self._run = self._stage = None
        self._started_at = 0.0
        self._rerouted: list[tuple[Any, Any]] = []
        self._stderr_before: Any = sys.stderr
        self._lock = threading.Lock()

    def __call__(self, label: str, done: int, total: int, percent: float) -> None:
        with self._lock:
            p = self._progress
            if self._run is None:
                self._stderr_before = sys.stderr  # what handlers hold, before rich redirects it
                p.start()
                self._reroute_logging()
                self._run = p.add_task("run", total=100.0, count="  0.0%")
            if label != self._label:
                self._end_stage()
                self._label, self._started_at = label, p.get_time()
                self._stage = p.add_task(label, total=max(total, 1), count="")
            p.update(self._stage, completed=min(max(done, 0), max(total, 1)), total=max(total, 1),
                     count=f"{done}/{total}")
            p.update(self._run, completed=percent, count=f"{percent:5.1f}%")
            p.refresh()
            if percent >= 100.0:  # the run is over: the command's results print below, not into the rows
                self._stop()

    def _end_stage(self) -> None:
        if self._stage is None:
            return
        task = next(t for t in self._progress.tasks if t.id == self._stage)
        # The stage is over when the next one starts, whatever its last report said.
        count = f"{int(task.total)}/{int(task.total)} " if task.total and task.total > 1 else ""
        self._progress.console.print(f"{task.description:<24.24} done {count}in "
                                     f"{self._progress.get_time() - self._started_at:.1f} s", markup=False)
        self._progress.remove_task(self._stage)
        self._stage, self._label = None, None

    def _stop(self) -> None:
        if self._run is None:
            return
        self._end_stage()
        self._progress.refresh()
        self._restore_logging()
        self._progress.stop()
        for task in list(self._progress.tasks):
            self._progress.remove_task(task.id)
        self._run = None

    def _reroute_logging(self) -> None:
        """Logging handlers that write to the terminal stream write to the redirect instead (see class doc)."""
        proxy, real = sys.stderr, {id(self.stream), id(sys.__stderr__), id(self._stderr_before)}
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for handler in {h for lg in loggers for h in lg.handlers}:
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in real and proxy is not handler.stream:
                self._rerouted.append((handler, handler.stream))
                handler.setStream(proxy)
                console = getattr(handler, "console", None)  # Prefect's handler prints through its own rich console
                if console is not None and id(console.file) in real:
                    console.file = proxy

    def _restore_logging(self) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
            console = getattr(handler, "console", None)
            if console is not None:
                console.file = stream
        self._rerouted.clear()

    def close(self) -> None:
        with self._lock:
            self._stop()


@contextlib.contextmanager
def terminal_bar(stream, enabled: bool | None = None) -> Iterator[None]:
    """Show flows' progress on `stream` while open. `enabled=None`: only when `stream` is a terminal."""
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    if not enabled:
        yield
        return
    bar = TerminalBar(stream, force_terminal=True)
    try:
        with display(bar):
            yield
    finally:
        bar.close()
