"""Garbage collection on the GUI thread only.

Python's cyclic collector runs in whichever thread happens to allocate. When that is a worker thread
and the garbage holds Qt wrappers (a closed dialog, a finished worker's signals), Qt objects get
destroyed outside the GUI thread and the process can crash (seen as a segfault while a worker loaded a
model). So automatic collection is switched off and a timer collects on the GUI thread instead, the
way pyqtgraph's GarbageCollector does.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

INTERVAL_MS = 1000


class GuiThreadGarbageCollector(QObject):
    """While alive (until ``stop``), cyclic garbage is collected on the GUI thread every second."""

    def __init__(self, parent: QObject | None = None, interval_ms: int = INTERVAL_MS) -> None:
        super().__init__(parent)
        self.thresholds = gc.get_threshold()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.collect)
        gc.disable()
        self.timer.start(interval_ms)

    def collect(self) -> None:
        """Collect the generations whose counts passed their thresholds, as the automatic collector would."""
        counts = gc.get_count()
        for generation in (2, 1, 0):
            if counts[generation] > self.thresholds[generation]:
                gc.collect(generation)
                return

    def stop(self) -> None:
        self.timer.stop()
        gc.enable()
