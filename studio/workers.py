"""One façade over superqt workers: long work runs in a thread, the GUI hears about it through signals.

A *job* is a core generator (see core/progress.py): it yields ``ProgressEvent``s (or other values,
such as chat text pieces) and returns its result. ``JobRunner.run`` drives one job at a time in a
``GeneratorWorker``; progress becomes an overall fraction with an ETA; ``cancel`` asks the worker to
stop at the next yield and the generator is closed *in the worker thread*, so its ``finally`` blocks
(temporary folders, model flags) run before the job is reported finished. Errors go to the
``ErrorReporter``. ``run_light`` is for short computations (readout previews) that may run beside a
job because they only read data the job does not touch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from PySide6.QtCore import QObject, QThreadPool, Signal
from superqt.utils import GeneratorWorker, create_worker

from core.progress import ProgressEvent
from studio.errors import ErrorReporter

MIN_FRACTION_FOR_ETA = 0.03


class _JobWorker(GeneratorWorker):
    """A GeneratorWorker with the loop a job needs.

    * On quit the generator is closed here, in the worker thread, so its cleanup has run before
      ``finished`` (superqt's loop just stops sending; cleanup would wait for garbage collection).
    * Every exception reaches ``errored`` (superqt's loop swallows RuntimeError, which is what torch
      raises, and then never emits ``finished``).
    """

    def work(self):
        try:
            while True:
                if self.abort_requested:
                    self.aborted.emit()
                    return None
                try:
                    value = self._gen.send(None)
                except StopIteration as stop:
                    return stop.value
                self.yielded.emit(value)
        finally:
            if self.abort_requested:
                self._gen.close()


def _drive(job: Callable[[], Generator]) -> Generator:
    """Run ``job()`` inside the worker thread (calling it may already do work) and pass its result on."""
    return (yield from job())


@dataclass(frozen=True)
class JobProgress:
    """One progress update: the event, the overall fraction (0..1) and the seconds left (None: unknown)."""

    title: str
    event: ProgressEvent
    overall: float
    eta_seconds: float | None


class ProgressTracker:
    """Turns stage events into an overall fraction, given each stage's share of the work.

    stages: stage name -> weight, in the order the job runs them. Stages not listed count as zero
    weight; an earlier stage never seen (skipped) counts as finished once a later one reports.
    """

    def __init__(self, stages: dict[str, float] | None) -> None:
        self.order = list(stages or {})
        total = sum((stages or {}).values()) or 1.0
        self.weights = {name: weight / total for name, weight in (stages or {}).items()}
        self.started = time.perf_counter()
        self.overall = 0.0
        self.fractions: dict[str, float] = {}

    def update(self, event: ProgressEvent) -> tuple[float, float | None]:
        if event.stage in self.weights:
            # Stages may interleave (a streaming run alternates sensitivity and k-means block by block):
            # each keeps its own fraction; an earlier stage never seen was skipped and counts as done.
            self.fractions[event.stage] = max(self.fractions.get(event.stage, 0.0), event.fraction)
            for name in self.order[:self.order.index(event.stage)]:
                self.fractions.setdefault(name, 1.0)
            done = sum(self.weights[name] * fraction for name, fraction in self.fractions.items())
            self.overall = max(self.overall, done)
        elif not self.weights:
            self.overall = event.fraction
        elapsed = time.perf_counter() - self.started
        eta = None
        if self.overall >= MIN_FRACTION_FOR_ETA:
            eta = elapsed * (1.0 - self.overall) / self.overall
        return self.overall, eta


class JobRunner(QObject):
    """Runs at most one heavy job at a time; every page starts its long work here."""

    started = Signal(str)  # title
    progress = Signal(object)  # JobProgress
    finished = Signal(str, str)  # title, outcome: "done" | "cancelled" | "failed"
    busy_changed = Signal(bool)

    def __init__(self, reporter: ErrorReporter, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.reporter = reporter
        self.worker: _JobWorker | None = None
        self.title = ""
        self._light: set = set()
        self._closed = False

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def run(self, title: str, job: Callable[[], Generator], *, on_result: Callable | None = None,
            on_yield: Callable | None = None, stages: dict[str, float] | None = None,
            on_end: Callable[[str], None] | None = None) -> bool:
        """Start ``job()`` (a generator function of no arguments) in a worker thread.

        on_result(value) gets the return value on the GUI thread; on_yield(value) gets every yielded
        value that is not a ProgressEvent; on_end(outcome) runs last whatever happened. Returns False
        (and tells the user) when another job is running.
        """
        if self.busy:
            self.reporter.show_message("Another job is running",
                                       f"Wait for '{self.title}' to finish, or cancel it first.")
            return False
        tracker = ProgressTracker(stages)
        worker = _JobWorker(_drive, job)
        outcome = {"value": "done"}
        worker.yielded.connect(lambda value: self._on_yield(title, tracker, value, on_yield))
        if on_result is not None:
            worker.returned.connect(on_result)
        worker.errored.connect(lambda exc: self._on_error(title, exc, outcome))
        worker.aborted.connect(lambda: outcome.update(value="cancelled"))
        worker.finished.connect(lambda: self._on_finished(worker, title, outcome["value"], on_end))
        self.worker, self.title = worker, title
        self.busy_changed.emit(True)
        self.started.emit(title)
        worker.start()
        return True

    def cancel(self) -> None:
        """Ask the running job to stop at its next yield (it cleans up, then reports 'cancelled')."""
        if self.worker is not None:
            self.worker.quit()

    @property
    def cancelling(self) -> bool:
        return self.worker is not None and self.worker.abort_requested

    def run_light(self, function: Callable, *args, on_result: Callable, action: str,
                  on_end: Callable[[], None] | None = None) -> None:
        """Run a short function beside the heavy job; its result reaches ``on_result`` on the GUI thread,
        then ``on_end()`` runs whatever happened."""
        if self._closed:
            return
        worker = create_worker(function, *args, _start_thread=False, _ignore_errors=True)
        # after shutdown the pages that asked may be gone: their callbacks are dropped
        worker.returned.connect(lambda value: None if self._closed else on_result(value))
        worker.errored.connect(lambda exc: None if self._closed else self.reporter.report(exc, action))
        worker.finished.connect(lambda: self._light.discard(worker))
        if on_end is not None:
            worker.finished.connect(lambda: None if self._closed else on_end())
        self._light.add(worker)
        worker.start()

    def shutdown(self, msecs: int = 10000) -> bool:
        """The window is closing: start nothing more, stop what runs, wait for the threads to end."""
        self._closed = True
        self.cancel()
        return self.wait(msecs)

    def wait(self, msecs: int = 30000) -> bool:
        """Block until every worker thread has ended (shutdown and tests); True when they did."""
        return QThreadPool.globalInstance().waitForDone(msecs)

    def _on_yield(self, title: str, tracker: ProgressTracker, value, on_yield: Callable | None) -> None:
        if isinstance(value, ProgressEvent):
            overall, eta = tracker.update(value)
            self.progress.emit(JobProgress(title, value, overall, eta))
        elif on_yield is not None:
            on_yield(value)

    def _on_error(self, title: str, exc: BaseException, outcome: dict) -> None:
        outcome["value"] = "failed"
        self.reporter.report(exc, title.lower())

    def _on_finished(self, worker, title: str, outcome: str, on_end: Callable | None) -> None:
        if self.worker is worker:
            self.worker, self.title = None, ""
        try:
            if on_end is not None:
                on_end(outcome)
        finally:
            self.finished.emit(title, outcome)
            self.busy_changed.emit(False)
