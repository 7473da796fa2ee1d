"""Inspect page: where a model's outliers and sensitive weights are, and what a setting would cost."""

from __future__ import annotations

import sys

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from core.models import block_index, short_module_name
from studio.format import human_bytes
from studio.jobs import ANALYSE_STAGES, SENSITIVITY_STAGES, analyse_job, sensitivity_job
from studio.model_info import matrix_names, quantized_modules
from studio.pages.base import Page, caption, group
from studio.plots.histogram import HistogramPlot, MatrixHistograms, matrix_histograms
from studio.plots.layers import LayerBars, LayerHeatMap
from studio.previewer import Previewer
from studio.widgets.progress_panel import JobProgressPanel
from studio.widgets.quant_controls import QuantControls
from studio.widgets.readouts import ReadoutsPanel

ANALYSE_TITLE = "Analysing the weights"
SENSITIVITY_TITLE = "Computing sensitivity"
# A model whose quantizable weights take more than this is analysed when asked (its pass reads them all
# from disk, minutes for an 8 B model), smaller ones automatically on the first visit.
AUTO_ANALYSE_BYTES = 1 << 30


class InspectPage(Page):
    title = "Inspect"
    description = ("Quantization stores each weight as one of a few values per row (8 at 3 bits, 16 at 4 bits). "
                   "A few weights matter much more than the rest: <b>outliers</b> (unusually large) and "
                   "<b>sensitive</b> ones (changing them hurts the model most, measured on sample text). "
                   "SqueezeLLM keeps those exactly in a small sparse part. Pick a matrix, move the settings, "
                   "and watch the cost.")

    def __init__(self, session, runner, parent: QWidget | None = None) -> None:
        super().__init__(session, runner, parent)
        self.previewer = Previewer(session, runner, self)
        self._auto_analysed = None
        self._histogram_request = 0
        self._histogram_key: tuple | None = None  # (matrix, model, Fisher) of the histograms drawn or on the way
        self._histograms: MatrixHistograms | None = None
        self.matrix_tree = QTreeWidget()
        self.matrix_tree.setHeaderLabel("Matrices")
        self.matrix_tree.setToolTip("Every quantizable matrix, by decoder block and module")
        self.analyse_status = caption("Open a model on the Model page first.")
        self.analyse_button = QPushButton("Analyse weights")
        self.analyse_button.setToolTip("Condense every matrix once, reading them from the weight files one at a "
                                       "time, so that the readouts follow the controls live. Finished blocks are "
                                       "cached on disk: a cancelled pass resumes where it stopped.")
        self.analyse_panel = JobProgressPanel(runner, {"stats": "Matrices"}, show_log=False, show_overall=False)
        self.controls = QuantControls(sliders=True)
        self.readouts_panel = ReadoutsPanel()
        self.readouts = self.readouts_panel.values
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 10000)
        self.samples_spin.setToolTip("Calibration windows of sample text used to measure sensitivity; "
                                     "more is slower and a little better (shared with the Quantize page).")
        self.compute_button = QPushButton("Compute sensitivity")
        self.compute_button.setToolTip("Measure how much each weight matters (squared gradients on sample text). "
                                       "The result is cached on disk and reused.")
        self.sensitivity_panel = JobProgressPanel(runner, {"fisher": "Progress"}, show_log=False, show_overall=False)
        self.weight_hist = HistogramPlot("Weights of the selected matrix", "weight value")
        self.fisher_hist = HistogramPlot("Sensitivity of the selected matrix", "log10(Fisher information)")
        self.centroid_row_spin = QSpinBox()
        self.centroid_row_spin.setToolTip("Each row of a quantized matrix has its own lookup table: "
                                          "the triangles are the values row r may use")
        self.centroid_note = QLabel("")
        self.centroid_row_label = QLabel("LUT row")
        self.layer_bars = LayerBars()
        self.heatmap = LayerHeatMap()
        self._layout()
        self._connect()
        self.update_actions()

    def _layout(self) -> None:
        left = QWidget()
        column = QVBoxLayout(left)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.matrix_tree, 1)
        column.addWidget(self.analyse_status)
        column.addWidget(self.analyse_button)
        column.addWidget(self.analyse_panel)
        sensitivity = QWidget()
        sens_layout = QVBoxLayout(sensitivity)
        sens_layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(QLabel("Samples"))
        row.addWidget(self.samples_spin)
        row.addWidget(self.compute_button, 1)
        sens_layout.addLayout(row)
        sens_layout.addWidget(self.sensitivity_panel)
        top = QHBoxLayout()
        top.addWidget(group("Setting", self.controls), 3)
        top.addWidget(group("What it costs (whole model)", self.readouts_panel), 3)
        top.addWidget(group("Sensitivity", sensitivity), 2)
        centroids = QHBoxLayout()
        centroids.addWidget(self.centroid_note, 1)
        centroids.addWidget(self.centroid_row_label)
        centroids.addWidget(self.centroid_row_spin)
        weights = QWidget()
        weights_layout = QVBoxLayout(weights)
        weights_layout.setContentsMargins(0, 0, 0, 0)
        weights_layout.addWidget(self.weight_hist, 1)
        weights_layout.addLayout(centroids)
        plots = QGridLayout()
        plots.addWidget(weights, 0, 0)
        plots.addWidget(self.fisher_hist, 0, 1)
        plots.addWidget(self.layer_bars, 1, 0)
        plots.addWidget(self.heatmap, 1, 1)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addLayout(top)
        right_layout.addLayout(plots, 1)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([150, 1000])
        self.outer.addWidget(splitter, 1)

    def _connect(self) -> None:
        session = self.session
        self.controls.changed.connect(lambda: session.set_quant_config(self.controls.value()))
        session.quant_config_changed.connect(self._show_config)
        session.calibration_changed.connect(self._show_calibration)
        session.model_changed.connect(self._on_model_changed)
        session.stats_changed.connect(self._on_stats_changed)
        session.fisher_changed.connect(self._show_matrix)
        session.results_changed.connect(self._show_matrix)
        self.samples_spin.valueChanged.connect(lambda n: session.update_calibration(samples=n))
        self.previewer.ready.connect(self._show_preview)
        self.previewer.cleared.connect(self._clear_preview)
        self.matrix_tree.currentItemChanged.connect(lambda *_: self._show_matrix())
        self.centroid_row_spin.valueChanged.connect(lambda _row: self._show_matrix())
        self.heatmap.matrix_clicked.connect(self.select_matrix)
        self.analyse_button.clicked.connect(self.analyse)
        self.runner.finished.connect(self._job_finished)
        # the first visit analyses the model once the loading job has ended
        self.runner.busy_changed.connect(lambda busy: None if busy or not self.isVisible() else self.page_shown())
        self.compute_button.clicked.connect(self.compute_sensitivity)
        self._show_config()
        self._show_calibration()

    # ------------------------------------------------------------ jobs

    def analyse(self) -> bool:
        """Condense every matrix (a job, block by block from the files, cached) so that previews can run;
        automatic on the first visit for models up to AUTO_ANALYSE_BYTES."""
        model = self.session.model
        if model is None or model.quantized:
            return False
        self.analyse_panel.watch(ANALYSE_TITLE)
        return self.runner.run(ANALYSE_TITLE, lambda: analyse_job(model),
                               on_result=lambda stats: self._analysed(model, stats), stages=ANALYSE_STAGES)

    def _job_finished(self, title: str, outcome: str) -> None:
        """(After the panel's own slot.) A cancelled analysis kept its finished blocks: say so."""
        if title == ANALYSE_TITLE and outcome == "cancelled":
            self.analyse_panel.eta_label.setText("cancelled: finished blocks are cached, Analyse resumes")

    def _analysed(self, model, stats: list) -> None:
        if model is self.session.model:
            self.session.set_stats(stats)

    def compute_sensitivity(self) -> bool:
        model, calibration = self.session.model, self.session.calibration
        if model is None or model.quantized:
            return False
        self.sensitivity_panel.watch(SENSITIVITY_TITLE)
        return self.runner.run(SENSITIVITY_TITLE, lambda: sensitivity_job(model, calibration),
                               on_result=lambda result: self._sensitivity_ready(model, calibration, result),
                               stages=SENSITIVITY_STAGES)

    def _sensitivity_ready(self, model, calibration, result: tuple) -> None:
        if model is self.session.model:
            fisher, stats = result
            self.session.set_fisher(fisher, calibration, stats)

    def page_shown(self) -> None:
        """Analyse a new model automatically, once (a cancelled or failed analysis is not retried)."""
        model = self.session.model
        if self.session.has_dense_model and self.session.stats is None and not self.runner.busy \
                and self._auto_analysed is not model and self.session.info.quantizable_bytes <= AUTO_ANALYSE_BYTES:
            self._auto_analysed = model
            self.analyse()

    # ------------------------------------------------------------ model and matrix

    def _on_model_changed(self) -> None:
        self._histogram_key, self._histograms = None, None
        self.matrix_tree.clear()
        loaded = self.session.model
        if loaded is not None:
            blocks: dict[int, QTreeWidgetItem] = {}
            for name in sorted(matrix_names(loaded), key=lambda n: _tree_group(n)[0]):  # blocks first
                index, title = _tree_group(name)
                if index not in blocks:
                    blocks[index] = QTreeWidgetItem(self.matrix_tree, [title])
                child = QTreeWidgetItem(blocks[index], [short_module_name(name)])
                child.setData(0, Qt.ItemDataRole.UserRole, name)
                child.setToolTip(0, name)
            if blocks:
                first = blocks[min(blocks)]
                first.setExpanded(True)
                self.matrix_tree.setCurrentItem(first.child(0))
        self._on_stats_changed()
        if self.isVisible():
            self.page_shown()

    def selected_matrix(self) -> str | None:
        item = self.matrix_tree.currentItem()
        return item.data(0, Qt.ItemDataRole.UserRole) if item is not None else None

    def select_matrix(self, name: str) -> None:
        for item in self.matrix_tree.findItems("*", Qt.MatchFlag.MatchWildcard | Qt.MatchFlag.MatchRecursive):
            if item.data(0, Qt.ItemDataRole.UserRole) == name:
                self.matrix_tree.setCurrentItem(item)
                return

    def _show_matrix(self) -> None:
        """Histograms of the selected matrix, computed in a light worker (the latest request wins).

        The matrix is read (an original's from its file) once per selection: a redraw for other reasons
        (a new result's centroids, another LUT row) reuses the histograms drawn or on the way.
        """
        name, loaded = self.selected_matrix(), self.session.model
        if name is None or loaded is None:
            self._histogram_request += 1
            self._histogram_key, self._histograms = None, None
            self.weight_hist.clear_data("Pick a matrix on the left")
            self.fisher_hist.clear_data("")
            return
        self.layer_bars.select(name)
        fisher = (self.session.fisher or {}).get(name)
        key = (name, id(loaded), id(fisher))
        if key == self._histogram_key:
            if self._histograms is not None:
                self._draw_histograms(self._histogram_request, name, self._histograms)
            return
        self._histogram_request += 1
        self._histogram_key, self._histograms = key, None
        request = self._histogram_request
        self.runner.run_light(matrix_histograms, loaded, name, fisher, action="drawing the histograms",
                              on_result=lambda result: self._draw_histograms(request, name, result))

    def _draw_histograms(self, request: int, name: str, result: MatrixHistograms) -> None:
        if request != self._histogram_request:
            return  # the selection moved on meanwhile
        self._histograms = result
        self.weight_hist.set_histogram(*result.weights)
        self._show_threshold()
        self._show_centroids(name)
        if result.fisher is None:
            self.fisher_hist.clear_data("Press 'Compute sensitivity' to see which weights matter most")
            return
        counts, edges, zeros = result.fisher
        self.fisher_hist.set_histogram(counts, edges)
        self.fisher_hist.setTitle(f"Sensitivity of the selected matrix ({zeros:,} entries are exactly 0)"
                                  if zeros else "Sensitivity of the selected matrix")

    def _show_threshold(self) -> None:
        preview, name = self.previewer.latest, self.selected_matrix()
        layer = next((item for item in preview.layers if item.name == name), None) if preview is not None else None
        self.weight_hist.set_thresholds(layer.threshold if layer is not None else None)

    def _show_centroids(self, name: str) -> None:
        source = self.session.model if self.session.model.quantized else None
        if source is None and self.session.latest_result is not None:
            source = self.session.latest_result.loaded
        module = quantized_modules(source.model).get(name) if source is not None else None
        table = getattr(module, "lookup_table", None)
        visible = table is not None
        for widget in (self.centroid_row_spin, self.centroid_note, self.centroid_row_label):
            widget.setVisible(visible)
        if not visible:
            self.weight_hist.set_markers(None)
            return
        self.centroid_row_spin.setMaximum(table.shape[0] - 1)
        row = self.centroid_row_spin.value()
        self.centroid_note.setText(f"▲ the {table.shape[1]} values row {row} of {source.name} may use")
        self.weight_hist.set_markers(table[row].float().cpu().numpy())

    # ------------------------------------------------------------ settings and readouts

    def _show_config(self) -> None:
        if self.controls.value() != self.session.quant_config:
            self.controls.set_value(self.session.quant_config)

    def _show_calibration(self) -> None:
        self.samples_spin.blockSignals(True)
        self.samples_spin.setValue(self.session.calibration.samples)
        self.samples_spin.blockSignals(False)

    def _on_stats_changed(self) -> None:
        session = self.session
        if session.model is None:
            self.analyse_status.setText("Open a model on the Model page first.")
        elif session.model.quantized:
            self.analyse_status.setText("This model is already quantized: the histograms show its effective "
                                        "weights. Open the original to tune a setting.")
        elif session.stats is None:
            self.analyse_status.setText(f"The readouts need one pass over every matrix: it reads "
                                        f"{human_bytes(session.info.quantizable_bytes)} from disk, one matrix at "
                                        "a time (press Analyse).")
        else:
            with_fisher = " with sensitivity" if session.fisher is not None else ""
            self.analyse_status.setText(f"{len(session.stats)} matrices analysed{with_fisher}.")
        if session.stats is None:
            self._clear_preview()
        self.update_actions()

    def _clear_preview(self) -> None:
        self.readouts_panel.clear()
        self.layer_bars.set_layers([], np.zeros(0), np.zeros(0))
        self.weight_hist.set_thresholds(None)

    def _show_preview(self, preview) -> None:
        self.readouts_panel.show_preview(preview, self.session.info)
        names = [layer.name for layer in preview.layers]
        outliers = np.array([100.0 * layer.outliers / max(1, layer.numel) for layer in preview.layers])
        sensitive = np.array([100.0 * layer.sensitive / max(1, layer.numel) for layer in preview.layers])
        self.layer_bars.set_layers(names, outliers, sensitive)
        self.layer_bars.select(self.selected_matrix())
        self.heatmap.set_layers(names, outliers)
        self._show_threshold()

    def update_actions(self) -> None:
        idle = not self.runner.busy
        dense = self.session.has_dense_model
        self.analyse_button.setEnabled(idle and dense and self.session.stats is None)
        self.compute_button.setEnabled(idle and dense)
        self.samples_spin.setEnabled(idle)
        self.controls.setEnabled(dense)


def _tree_group(name: str) -> tuple[int, str]:
    """(order, title) of the matrix tree's group for ``name``: its decoder block, or, last, the embedding
    and head (a quantized result's lookup-table embedding / head outside the blocks)."""
    try:
        index = block_index(name)
    except ValueError:
        return sys.maxsize, "Embedding and head"
    return index, f"Block {index}"
