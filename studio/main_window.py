"""The main window: composition only. A sidebar of pages, menus and shortcuts, and a status bar that
always shows the current model and the running job (progress, time left, Cancel)."""

from __future__ import annotations

import json

from PySide6.QtCore import QSize, QUrl
from PySide6.QtGui import QAction, QCloseEvent, QDesktopServices, QKeySequence
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QStackedWidget,
    QWidget,
)

from core.config import CalibrationConfig, ChatConfig, EvalConfig, QuantConfig, from_dict, to_dict
from studio import storage
from studio.errors import ErrorReporter
from studio.pages.chat import ChatPage
from studio.pages.evaluate import EvaluatePage
from studio.pages.inspect import InspectPage
from studio.pages.model import ModelPage
from studio.pages.quantize import QuantizePage
from studio.resources import icon
from studio.session import Session
from studio.widgets.progress_panel import format_seconds
from studio.workers import JobProgress, JobRunner

PAGES = (("model", ModelPage), ("inspect", InspectPage), ("quantize", QuantizePage), ("evaluate", EvaluatePage),
         ("chat", ChatPage))
CONFIGS = (("quant_config", QuantConfig), ("calibration", CalibrationConfig), ("eval_config", EvalConfig),
           ("chat_config", ChatConfig))


class MainWindow(QMainWindow):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("Squeeze Studio")
        self.setWindowIcon(icon("app"))
        self.reporter = ErrorReporter(self)
        self.runner = JobRunner(self.reporter, self)
        self.session = Session(self)
        self._restore_configs()
        self._close_when_idle = False
        self.sidebar = QListWidget()
        self.sidebar.setObjectName("sidebar")
        self.sidebar.setIconSize(QSize(22, 22))
        self.stack = QStackedWidget()
        self.pages: dict[str, QWidget] = {}
        for name, cls in PAGES:
            page = cls(self.session, self.runner)
            self.pages[name] = page
            self.stack.addWidget(page)
            item = QListWidgetItem(icon(name), page.title)
            item.setToolTip(page.description)
            self.sidebar.addItem(item)
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.sidebar)
        layout.addWidget(self.stack, 1)
        self.setCentralWidget(central)
        self._build_status_bar()
        self._build_menus()
        self.sidebar.currentRowChanged.connect(self._on_page_changed)
        self.pages["model"].model_loaded.connect(lambda: self.show_page("inspect"))
        self.pages["quantize"].open_page.connect(self._open_result_page)
        self.session.model_changed.connect(self._show_model)
        self.runner.started.connect(self._on_job_started)
        self.runner.progress.connect(self._on_job_progress)
        self.runner.finished.connect(self._on_job_finished)
        self._restore_window()

    # ------------------------------------------------------------ building

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.model_label = QLabel("No model")
        self.model_label.setObjectName("statusModel")
        self.job_label = QLabel("Idle")
        self.job_progress = QProgressBar()
        self.job_progress.setRange(0, 1000)
        self.job_progress.setFixedWidth(220)
        self.job_progress.setTextVisible(True)
        self.eta_label = QLabel("")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running job at its next step (Esc)")
        self.cancel_button.clicked.connect(self.runner.cancel)
        bar.addWidget(self.model_label, 1)
        for widget in (self.job_label, self.job_progress, self.eta_label, self.cancel_button):
            bar.addPermanentWidget(widget)
        self._set_job_widgets_visible(False)

    def _build_menus(self) -> None:
        model_page: ModelPage = self.pages["model"]
        file_menu = self.menuBar().addMenu("&File")
        self._action(file_menu, "Open the &demo model", "Ctrl+D", lambda: model_page.open_model("demo"))
        self._action(file_menu, "&Open model folder…", "Ctrl+O", model_page.browse_folder)
        self._action(file_menu, "Open &GGUF file…", "Ctrl+Shift+O", model_page.browse_gguf)
        self.recent_menu = file_menu.addMenu("&Recent models")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addSeparator()
        for action, shortcut in ((model_page.import_action, "Ctrl+I"), (model_page.export_action, "Ctrl+Shift+E")):
            action.setShortcut(QKeySequence(shortcut))
            file_menu.addAction(action)
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", QKeySequence.StandardKey.Quit, self.close)
        run_menu = self.menuBar().addMenu("&Run")
        self._action(run_menu, "Compute &sensitivity", "Ctrl+K", self.pages["inspect"].compute_sensitivity)
        self._action(run_menu, "&Quantize", "Ctrl+R", self.pages["quantize"].start)
        self._action(run_menu, "&Evaluate", "Ctrl+E", self.pages["evaluate"].start)
        self._action(run_menu, "&Cancel the running job", "Esc", self.runner.cancel)
        view_menu = self.menuBar().addMenu("&View")
        for index, (name, _cls) in enumerate(PAGES):
            self._action(view_menu, self.pages[name].title, f"Ctrl+{index + 1}",
                         lambda _checked=False, n=name: self.show_page(n))
        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "Open the &log folder", None,
                     lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(storage.data_dir()))))
        self._action(help_menu, "&About", None, self._about)

    def _action(self, menu, text: str, shortcut, slot) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        menu.addAction(action)
        return action

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        for spec in storage.recent_models() or []:
            self._action(self.recent_menu, spec, None, lambda s=spec: self.pages["model"].open_model(s))

    # ------------------------------------------------------------ pages

    def show_page(self, name: str) -> None:
        self.sidebar.setCurrentRow([n for n, _ in PAGES].index(name))

    def current_page_name(self) -> str:
        return PAGES[max(0, self.stack.currentIndex())][0]

    def _on_page_changed(self, row: int) -> None:
        self.stack.setCurrentIndex(row)
        self.stack.currentWidget().page_shown()

    def _open_result_page(self, name: str) -> None:
        if name == "chat":
            self.pages["chat"].select_mode("side" if self.session.has_dense_model else "quantized")
        self.show_page(name)

    def open_model(self, spec: str) -> bool:
        return self.pages["model"].open_model(spec)

    def _show_model(self) -> None:
        info = self.session.info
        self.model_label.setText("No model" if info is None else
                                 f"Model: <b>{info.name}</b>{' (quantized)' if info.quantized else ''}")

    def _about(self) -> None:
        QMessageBox.about(self, "Squeeze Studio", "Squeeze Studio: SqueezeLLM dense-and-sparse quantization.\n"
                          f"Settings and logs: {storage.data_dir()}")

    # ------------------------------------------------------------ jobs in the status bar

    def _set_job_widgets_visible(self, visible: bool) -> None:
        for widget in (self.job_progress, self.eta_label, self.cancel_button):
            widget.setVisible(visible)

    def _on_job_started(self, title: str) -> None:
        self.job_label.setText(f"{title}…")
        self.job_progress.setValue(0)
        self.eta_label.setText("")
        self._set_job_widgets_visible(True)
        self.cancel_button.setEnabled(True)

    def _on_job_progress(self, progress: JobProgress) -> None:
        event = progress.event
        self.job_progress.setRange(0, 1000 if event.total or progress.overall else 0)  # 0: busy indicator
        self.job_progress.setValue(int(1000 * progress.overall))
        self.job_label.setText(f"{progress.title}: {event.message or event.stage}"[:90])
        self.eta_label.setText("" if progress.eta_seconds is None else f"{format_seconds(progress.eta_seconds)} left")

    def _on_job_finished(self, title: str, outcome: str) -> None:
        self._set_job_widgets_visible(False)
        self.job_progress.setRange(0, 1000)
        self.job_label.setText({"done": f"{title}: done", "cancelled": f"{title}: cancelled",
                                "failed": f"{title}: failed"}.get(outcome, outcome))
        if self._close_when_idle:
            self.close()

    # ------------------------------------------------------------ closing and settings

    def confirm_close(self) -> bool:
        """Ask whether to cancel the running job and quit (tests replace this)."""
        answer = QMessageBox.question(self, "A job is running",
                                      f"'{self.runner.title}' is still running. Cancel it and quit?")
        return answer == QMessageBox.StandardButton.Yes

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.runner.busy:
            if self._close_when_idle or self.confirm_close():
                self._close_when_idle = True
                self.job_label.setText("Cancelling before closing…")
                self.runner.cancel()
            event.ignore()  # closed again once the job has stopped cleanly
            return
        self._save_state()
        self.runner.shutdown()  # light previews end within milliseconds
        event.accept()

    def _save_state(self) -> None:
        settings = storage.settings()
        settings.setValue("window/geometry", self.saveGeometry())
        settings.setValue("window/page", self.current_page_name())
        for attr, _cls in CONFIGS:
            settings.setValue(f"config/{attr}", json.dumps(to_dict(getattr(self.session, attr))))

    def _restore_configs(self) -> None:
        settings = storage.settings()
        for attr, cls in CONFIGS:
            try:
                setattr(self.session, attr, from_dict(cls, json.loads(str(settings.value(f"config/{attr}")))))
            except (TypeError, ValueError):
                pass  # nothing saved yet, or saved by an older version: keep the defaults

    def _restore_window(self) -> None:
        settings = storage.settings()
        geometry = settings.value("window/geometry")
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(1400, 900)
        page = settings.value("window/page")
        names = [n for n, _ in PAGES]
        self.sidebar.setCurrentRow(names.index(page) if page in names else 0)
