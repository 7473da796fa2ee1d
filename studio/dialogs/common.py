"""What the import and export dialogs share: a dialog that runs one job with an
overall bar, a log, Cancel, and a result line with a button that shows the result in its folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from studio.pages.base import caption
from studio.widgets.progress_panel import JobProgressPanel
from studio.workers import JobRunner

LOG_HEIGHT = 110


def show_in_folder(path: Path) -> None:
    """Open the file manager on ``path`` (a folder) or on the folder holding it (a file)."""
    QDesktopServices.openUrl(QUrl.fromLocalFile(str(path if path.is_dir() else path.parent)))


class JobDialog(QDialog):
    """A dialog whose main button starts one job in the shared JobRunner.

    Subclasses fill ``form`` and implement ``start``; while their job runs the form is disabled,
    Escape / closing cancels the job instead of closing, and the panel shows its progress.
    """

    job_title = ""

    def __init__(self, runner: JobRunner, title: str, intro: str, run_text: str,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self.setWindowTitle(title)
        self.setWindowModality(Qt.WindowModality.WindowModal)
        self.setMinimumWidth(640)
        self.form_widget = QWidget()
        self.form = QFormLayout(self.form_widget)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.panel = JobProgressPanel(runner, {}, show_log=True)
        self.panel.log_view.setMaximumHeight(LOG_HEIGHT)
        self.result_label = QLabel("")
        self.result_label.setObjectName("summary")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.show_button = QPushButton("Show in folder")
        self.show_button.setVisible(False)
        self.run_button = QPushButton(run_text)
        self.run_button.setObjectName("primary")
        self.close_button = QPushButton("Close")
        self.result_path: Path | None = None
        self._layout(intro)
        self.run_button.clicked.connect(self.start)
        self.close_button.clicked.connect(self.reject)
        self.show_button.clicked.connect(lambda: self.result_path and show_in_folder(self.result_path))
        runner.busy_changed.connect(lambda _busy: self.update_actions())

    def _layout(self, intro: str) -> None:
        buttons = QHBoxLayout()
        buttons.addWidget(self.show_button)
        buttons.addStretch(1)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.close_button)
        column = QVBoxLayout(self)
        column.addWidget(caption(intro))
        column.addWidget(self.form_widget)
        column.addWidget(self.panel)
        column.addWidget(self.result_label)
        column.addLayout(buttons)

    @property
    def running(self) -> bool:
        return self.runner.busy and self.runner.title == self.job_title

    def run_job(self, job: Callable, stages: dict[str, float], on_result: Callable,
                on_yield: Callable | None = None) -> bool:
        """Start ``job()`` in the runner under ``job_title``; the result line is cleared first."""
        self.show_result("", None)
        self.panel.log_view.clear()
        self.panel.watch(self.job_title)
        return self.runner.run(self.job_title, job, stages=stages, on_result=on_result, on_yield=on_yield,
                               on_end=self.job_ended)

    def show_result(self, text: str, path: Path | None) -> None:
        self.result_label.setText(text)
        self.result_path = path
        self.show_button.setVisible(path is not None)

    def start(self) -> bool:
        """Start the job from the form (override)."""
        raise NotImplementedError

    def job_ended(self, outcome: str) -> None:
        """The job ended ("done", "cancelled", "failed"): say so when nothing else did (extend)."""
        if outcome == "cancelled" and not self.result_label.text():
            self.show_result("Cancelled: nothing was written.", None)
        elif outcome == "failed":
            self.show_result("Failed (see the message); nothing was written.", None)

    def form_ready(self) -> bool:
        """Whether the form is complete enough to start (override)."""
        return True

    def update_actions(self) -> None:
        idle = not self.runner.busy
        self.form_widget.setEnabled(idle)
        self.run_button.setEnabled(idle and self.form_ready())
        self.close_button.setEnabled(not self.running)

    def reject(self) -> None:
        """Escape or the window's close button: cancel our running job, else close."""
        if self.running:
            self.runner.cancel()
            return
        super().reject()
