"""Progress of one page's job: a bar per stage, the overall bar with the time left, and a live log."""

from __future__ import annotations

from PySide6.QtWidgets import QGridLayout, QLabel, QPlainTextEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget

from studio.workers import JobProgress, JobRunner

MAX_LOG_LINES = 2000


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class JobProgressPanel(QWidget):
    """Shows the progress of the jobs this panel was told to ``watch`` (by title).

    stages: stage name -> label, in order; one bar each.
    """

    def __init__(self, runner: JobRunner, stages: dict[str, str], show_log: bool = True,
                 show_overall: bool = True, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self._watched: str | None = None
        self._seen: set[str] = set()
        grid = QGridLayout()
        grid.setColumnStretch(1, 1)
        self.stage_bars: dict[str, QProgressBar] = {}
        self._stage_labels: dict[str, QLabel] = {}
        for row, (stage, label) in enumerate(stages.items()):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(0)
            bar.setFormat("%p%")
            self._stage_labels[stage] = QLabel(label)
            grid.addWidget(self._stage_labels[stage], row, 0)
            grid.addWidget(bar, row, 1)
            self.stage_bars[stage] = bar
        self.overall_bar = QProgressBar()
        self.overall_bar.setRange(0, 1000)
        self.overall_bar.setObjectName("overallBar")
        overall_label = QLabel("<b>Overall</b>")
        grid.addWidget(overall_label, len(stages), 0)
        grid.addWidget(self.overall_bar, len(stages), 1)
        overall_label.setVisible(show_overall)
        self.overall_bar.setVisible(show_overall)
        self.eta_label = QLabel("")
        self.eta_label.setObjectName("etaLabel")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop at the next step; nothing half-written is left behind (Esc)")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(runner.cancel)
        grid.addWidget(self.eta_label, len(stages) + 1, 1)
        grid.addWidget(self.cancel_button, len(stages) + 1, 0)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(MAX_LOG_LINES)
        self.log_view.setPlaceholderText("The log of the run appears here.")
        self.log_view.setVisible(show_log)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(grid)
        layout.addWidget(self.log_view, 1)
        runner.progress.connect(self._on_progress)
        runner.finished.connect(self._on_finished)

    def show_stage(self, stage: str, visible: bool) -> None:
        """Show or hide the row of a stage that only some runs have."""
        self._stage_labels[stage].setVisible(visible)
        self.stage_bars[stage].setVisible(visible)

    def watch(self, title: str) -> None:
        """Follow the job ``title`` from now on (bars reset)."""
        self._watched = title
        self._seen = set()
        for bar in [*self.stage_bars.values(), self.overall_bar]:
            bar.setValue(0)
        self.eta_label.setText("starting…")
        self.cancel_button.setEnabled(True)
        self.log(f"— {title} —")

    def log(self, line: str) -> None:
        self.log_view.appendPlainText(line)

    def _on_progress(self, progress: JobProgress) -> None:
        if progress.title != self._watched:
            return
        event = progress.event
        bar = self.stage_bars.get(event.stage)
        if bar is not None:
            bar.setValue(int(1000 * event.fraction) if event.total else 0)
            if event.total:
                bar.setFormat(f"{event.done}/{event.total}")
            self._seen.add(event.stage)
            for stage in list(self.stage_bars)[:list(self.stage_bars).index(event.stage)]:
                if stage not in self._seen:  # skipped (e.g. a cached result); seen stages keep their own count
                    self.stage_bars[stage].setValue(1000)
        self.overall_bar.setValue(int(1000 * progress.overall))
        self.eta_label.setText(f"about {format_seconds(progress.eta_seconds)} left"
                               if progress.eta_seconds is not None else "estimating the time left…")
        if event.message:
            self.log(event.message)

    def _on_finished(self, title: str, outcome: str) -> None:
        if title != self._watched:
            return
        self.cancel_button.setEnabled(False)
        if outcome == "done":
            self.overall_bar.setValue(1000)
            for bar in self.stage_bars.values():
                bar.setValue(1000)
        self.eta_label.setText({"done": "finished", "cancelled": "cancelled: nothing was written",
                                "failed": "failed: see the message"}.get(outcome, outcome))
        self.log(f"— {outcome} —")
