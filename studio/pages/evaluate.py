"""Evaluate page: perplexity of the original and the quantized results, a lasting runs table, the Pareto view."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from core.checkpoint import is_quantized_folder, read_quantization_config
from studio.format import human_bytes, megabytes
from studio.jobs import EVALUATE_STAGES, EvalTarget, evaluate_job
from studio.pages.base import Page, group
from studio.plots.pareto import ParetoPlot
from studio.storage import RunsStore
from studio.widgets.config_form import ConfigForm
from studio.widgets.pickers import CorpusPicker
from studio.widgets.progress_panel import JobProgressPanel

EVALUATE_TITLE = "Evaluating"
ORIGINAL_KEY = "original"
COLUMNS = (("label", "Model"), ("bits", "Bits"), ("outliers", "Outliers"), ("sensitivity", "Sens. %"),
           ("size", "Size"), ("bits_per_weight", "Bits/w"), ("perplexity", "Perplexity"),
           ("tokens_per_second", "Tok/s"), ("seconds", "Secs"), ("corpus", "Text"))
COLUMN_TIPS = {"bits": "Bits of each dense code", "outliers": "Outlier setting: target share or IQR range",
               "sensitivity": "Share of each matrix kept exactly for its sensitivity",
               "size": "Size on disk of the model folder", "bits_per_weight": "Stored bits per quantizable weight",
               "perplexity": "Lower is better; compare runs on the same text only",
               "tokens_per_second": "Evaluation speed (tokens per second)", "seconds": "Evaluation time",
               "corpus": "Evaluation text, windows × tokens"}


def _cell(run: dict, key: str) -> str:
    value = run.get(key)
    if key == "size":
        return human_bytes(run.get("size_bytes"))
    if key == "corpus":
        return f"{Path(str(value)).name} {run.get('windows')}×{run.get('seqlen')}"
    if value is None:
        return "–"
    if key in ("perplexity", "bits_per_weight"):
        return f"{value:.3f}" if key == "perplexity" else f"{value:.2f}"
    if key in ("tokens_per_second", "seconds"):
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return str(value)


class EvaluatePage(Page):
    title = "Evaluate"
    description = ("How much did quantization cost? Perplexity measures how surprised a model is by real text "
                   "(lower is better; the original is the reference). Every run is kept in the table, also "
                   "after a restart, and drawn in the size-vs-perplexity plot: click a point to find its run.")

    def __init__(self, session, runner, parent: QWidget | None = None) -> None:
        super().__init__(session, runner, parent)
        self.store = RunsStore()
        self.runs: list[dict] = self.store.load()
        self.eval_form = ConfigForm(session.eval_config, ["source", "windows", "seqlen", "batch_size"],
                                    custom={"source": lambda meta: CorpusPicker(meta.get("tooltip", ""))})
        self.models_list = QListWidget()
        self.models_list.setToolTip("Tick the models to evaluate on the same text")
        self.run_button = QPushButton("Evaluate")
        self.run_button.setObjectName("primary")
        self.run_button.setToolTip("Measure the perplexity of every ticked model (Ctrl+E)")
        self.panel = JobProgressPanel(runner, {"eval": "Perplexity"}, show_log=False)
        self.runs_table = QTableWidget(0, len(COLUMNS))
        self.runs_table.setHorizontalHeaderLabels([label for _, label in COLUMNS])
        for c, (key, _label) in enumerate(COLUMNS):
            self.runs_table.horizontalHeaderItem(c).setToolTip(COLUMN_TIPS.get(key, ""))
        self.runs_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.runs_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.runs_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.runs_table.verticalHeader().hide()
        self.runs_table.horizontalHeader().setStretchLastSection(True)
        self.remove_button = QPushButton("Remove run")
        self.remove_button.setToolTip("Delete the selected row from the table (the model folder is kept)")
        self.pareto = ParetoPlot()
        self._layout()
        self.eval_form.changed.connect(self._on_form_edited)
        session.results_changed.connect(self.refresh_models)
        session.model_changed.connect(self.refresh_models)
        self.run_button.clicked.connect(self.start)
        self.remove_button.clicked.connect(self.remove_selected)
        self.runs_table.itemSelectionChanged.connect(self._on_row_selected)
        self.pareto.run_clicked.connect(self.select_run)
        self.refresh_models()
        self.show_runs()

    def _layout(self) -> None:
        left = QWidget()
        column = QVBoxLayout(left)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(group("Text", self.eval_form))
        column.addWidget(group("Models", self.models_list), 1)
        column.addWidget(self.run_button)
        column.addWidget(self.panel)
        table_box = QWidget()
        table_layout = QVBoxLayout(table_box)
        table_layout.setContentsMargins(0, 0, 0, 0)
        table_layout.addWidget(self.runs_table, 1)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.remove_button)
        table_layout.addLayout(buttons)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(group("Runs", table_box))
        right.addWidget(self.pareto)
        right.setSizes([320, 380])
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setSizes([280, 960])
        self.outer.addWidget(splitter, 1)

    def _on_form_edited(self) -> None:
        config = self.eval_form.value()
        if config is not None:
            self.session.eval_config = config

    # ------------------------------------------------------------ models

    def refresh_models(self) -> None:
        """One checkable line for the original and one per quantized result (new results ticked)."""
        checked = {self.models_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.models_list.count())
                   if self.models_list.item(i).checkState() == Qt.CheckState.Checked}
        known = {self.models_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.models_list.count())}
        self.models_list.clear()
        entries = []
        if self.session.has_dense_model:
            entries.append((ORIGINAL_KEY, f"Original: {self.session.model.name}"))
        entries += [(str(r.path), f"Quantized: {r.name}") for r in self.session.results]
        for key, text in entries:
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, key)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if key in checked or key not in known
                               else Qt.CheckState.Unchecked)
            self.models_list.addItem(item)
        self.update_actions()

    def _targets(self) -> list[EvalTarget]:
        targets = []
        for i in range(self.models_list.count()):
            item = self.models_list.item(i)
            if item.checkState() != Qt.CheckState.Checked:
                continue
            key = item.data(Qt.ItemDataRole.UserRole)
            if key == ORIGINAL_KEY and self.session.has_dense_model:
                model = self.session.model
                targets.append(EvalTarget("original", model, _source_path(model.source), {}))
            else:
                result = next((r for r in self.session.results if str(r.path) == key), None)
                if result is not None:
                    settings = read_quantization_config(result.path) if is_quantized_folder(result.path) else {}
                    targets.append(EvalTarget(result.name, result.loaded, str(result.path), settings))
        return targets

    # ------------------------------------------------------------ the run

    def start(self) -> bool:
        config = self.eval_form.value()
        targets = self._targets()
        if config is None or not targets:
            if not targets:
                self.runner.reporter.show_message("Nothing to evaluate", "Tick at least one model in the list.")
            return False
        self.panel.watch(EVALUATE_TITLE)
        return self.runner.run(EVALUATE_TITLE, lambda: evaluate_job(targets, config), stages=EVALUATE_STAGES,
                               on_result=self._add_runs)

    def _add_runs(self, rows: list[dict]) -> None:
        self.runs.extend(rows)
        self.store.save(self.runs)
        self.show_runs()
        if rows:
            self.select_run(rows[-1]["id"])

    def remove_selected(self) -> None:
        row = self.runs_table.currentRow()
        if 0 <= row < len(self.runs):
            del self.runs[row]
            self.store.save(self.runs)
            self.show_runs()

    # ------------------------------------------------------------ table and plot

    def show_runs(self) -> None:
        self.runs_table.setRowCount(len(self.runs))
        for r, run in enumerate(self.runs):
            for c, (key, _label) in enumerate(COLUMNS):
                item = QTableWidgetItem(_cell(run, key))
                if c > 0:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if key == "label":
                    item.setToolTip(f"{run.get('path') or run.get('label')}\nevaluated {run.get('date', '?')}")
                self.runs_table.setItem(r, c, item)
        self.runs_table.resizeColumnsToContents()
        self.pareto.set_runs([{"id": run["id"], "label": run.get("label", "?"),
                               "size_mb": megabytes(run.get("size_bytes")), "perplexity": run.get("perplexity")}
                              for run in self.runs])
        self.update_actions()

    def select_run(self, run_id: str) -> None:
        """Select the run ``run_id`` in the table and highlight it in the plot."""
        for r, run in enumerate(self.runs):
            if run.get("id") == run_id:
                self.runs_table.selectRow(r)
                self.runs_table.scrollToItem(self.runs_table.item(r, 0))
        self.pareto.select(run_id)

    def _on_row_selected(self) -> None:
        row = self.runs_table.currentRow()
        if 0 <= row < len(self.runs):
            self.pareto.select(self.runs[row].get("id"))
        self.update_actions()

    def selected_run_id(self) -> str | None:
        row = self.runs_table.currentRow()
        return self.runs[row].get("id") if 0 <= row < len(self.runs) else None

    def update_actions(self) -> None:
        idle = not self.runner.busy
        self.run_button.setEnabled(idle and self.models_list.count() > 0)
        self.eval_form.setEnabled(idle)
        self.remove_button.setEnabled(self.runs_table.currentRow() >= 0)


def _source_path(source: str) -> str | None:
    """The folder or file a model was opened from ('demo' is its converted folder)."""
    if source == "demo":
        from core.models import demo_model_dir

        return str(demo_model_dir())
    return source if Path(source).exists() else None
