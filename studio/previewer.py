"""Live readouts: what the current setting would do, recomputed off the GUI thread after each move.

``core.preview.preview`` takes ~20 ms with a range multiplier but 0.2-0.4 s with a target share on
the demo model (it solves for the multiplier), so it runs in a light worker. Moves are debounced
(DEBOUNCE_MS) and only the latest setting is computed: while one preview runs, newer requests
collapse into one pending request. The multiplier solved for a target share is remembered, so moving
the bits or the sensitivity afterwards costs the fast path only.
"""

from __future__ import annotations

import dataclasses

from PySide6.QtCore import QObject, QTimer, Signal

from core.config import QuantConfig
from core.preview import Preview, preview
from studio.session import Session
from studio.workers import JobRunner

DEBOUNCE_MS = 60


class Previewer(QObject):
    """Emits ``ready(Preview)`` for the session's current setting; ``cleared`` when none is possible."""

    ready = Signal(object)
    cleared = Signal()

    def __init__(self, session: Session, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session, self.runner = session, runner
        self.latest: Preview | None = None
        self._running = False
        self._pending = False
        self._solved: dict[float, float] = {}  # target % -> multiplier, for the current statistics
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._start)
        session.quant_config_changed.connect(self.request)
        session.stats_changed.connect(self._solved.clear)
        session.stats_changed.connect(self.request)

    @property
    def computing(self) -> bool:
        return self._running or self._pending or self._timer.isActive()

    def request(self) -> None:
        """Recompute soon (restarts the debounce timer)."""
        if self.session.stats is None or self.session.info is None:
            self.latest = None
            self.cleared.emit()
            return
        self._timer.start()

    def _start(self) -> None:
        if self._running:
            self._pending = True
            return
        stats, info = self.session.stats, self.session.info
        if stats is None or info is None:
            return
        config = self.session.quant_config
        self._running = True
        self.runner.run_light(preview, stats, self._with_known_multiplier(config), info.other_bytes,
                              info.memory_bytes, info.embed_head, on_result=lambda result: self._done(config, stats, result),
                              on_end=self._ended, action="previewing the setting")

    def _with_known_multiplier(self, config: QuantConfig) -> QuantConfig:
        """``config`` with its target share replaced by the multiplier already solved for it (same result)."""
        percent = config.outliers.percent
        solved = self._solved.get(percent) if percent is not None else None
        if solved is None or config.method != "squeezellm" or not config.outliers.enabled:
            return config
        outliers = dataclasses.replace(config.outliers, range_multiplier=solved, percent=None)
        return dataclasses.replace(config, outliers=outliers)

    def _done(self, config: QuantConfig, stats: list, result: Preview) -> None:
        if config.outliers.percent is not None and result.range_multiplier is not None:
            if stats is self.session.stats:
                self._solved[config.outliers.percent] = result.range_multiplier
        if config == self.session.quant_config and stats is self.session.stats:
            self.latest = result
            self.ready.emit(result)
        else:
            self._pending = True  # the setting moved on while this one was computed

    def _ended(self) -> None:
        self._running = False
        if self._pending:
            self._pending = False
            self._start()
