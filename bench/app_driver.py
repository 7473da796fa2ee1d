"""Driving the real studio window from a script: wait for what it does while its Qt event loop runs.

Used by bench.studio_memory and scripts/screenshots.py (both offscreen).
"""

from __future__ import annotations

import time
from pathlib import Path


class AppDriver:
    """Runs the Qt event loop while waiting for the window; an error the app reports stops the script."""

    def __init__(self, app, window) -> None:
        self.app, self.window = app, window
        self.errors: list[str] = []
        window.reporter.shown.connect(self.errors.append)

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.app.processEvents()
            if self.errors:
                raise SystemExit(f"the app reported an error while {what}: {self.errors[-1]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f} s while {what}")
            time.sleep(0.01)

    def job(self, start, what: str, timeout: float = 7200, on_progress=None) -> tuple[str, float]:
        """Start a job with ``start()`` and wait for its end; (outcome, seconds)."""
        outcomes: list[str] = []
        runner = self.window.runner
        finished = lambda _title, outcome: outcomes.append(outcome)  # noqa: E731
        runner.finished.connect(finished)
        if on_progress is not None:
            runner.progress.connect(on_progress)
        t0 = time.perf_counter()
        try:
            if start() is False:
                raise SystemExit(f"could not start {what}")
            self.wait(lambda: bool(outcomes) and not runner.busy, timeout, what)
        finally:
            runner.finished.disconnect(finished)
            if on_progress is not None:
                runner.progress.disconnect(on_progress)
        seconds = time.perf_counter() - t0
        print(f"{what}: {outcomes[-1]} in {seconds:.1f} s", flush=True)
        return outcomes[-1], seconds

    def finish(self, start, what: str, timeout: float = 3600) -> None:
        """``job`` that must end "done" (anything else stops the script)."""
        outcome, _ = self.job(start, what, timeout)
        if outcome != "done":
            raise SystemExit(f"{what}: {outcome}")

    def settle(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.app.processEvents()
            time.sleep(0.02)

    def grab(self, page: str, path: Path) -> None:
        self.window.show_page(page)
        self.settle(1.0)
        self.window.grab().save(str(path))
        print(f"saved {path}", flush=True)
