"""Histograms with log counts, the two outlier thresholds as lines, and LUT centroids as markers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
import torch
from PySide6.QtCore import Qt

from studio.plots.style import ACCENT, MARKER, THRESHOLD, style_plot

DEFAULT_BINS = 200


def value_histogram(values: torch.Tensor, bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64 [bins], edges float64 [bins + 1]) of every entry of ``values`` (any shape)."""
    flat = values.detach().reshape(-1).float().cpu().numpy()
    counts, edges = np.histogram(flat[np.isfinite(flat)], bins=bins)
    return counts, edges


def log_histogram(values: torch.Tensor, bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray, int]:
    """Histogram of log10 of the positive entries, and how many entries were zero (not drawable)."""
    flat = values.detach().reshape(-1).float().cpu().numpy()
    positive = flat[np.isfinite(flat) & (flat > 0)]
    if positive.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), int(flat.size)
    counts, edges = np.histogram(np.log10(positive), bins=bins)
    return counts, edges, int(flat.size - positive.size)


class HistogramPlot(pg.PlotWidget):
    """A histogram drawn as steps over a log count axis.

    ``set_thresholds(t)`` draws -t and +t; ``set_markers(xs)`` draws a triangle at each x above the bars.
    """

    def __init__(self, title: str, x_label: str, parent=None) -> None:
        super().__init__(parent)
        style_plot(self, title, x_label, "count (log scale)")
        self.setLogMode(x=False, y=True)
        self.curve = pg.PlotDataItem(stepMode="center", fillLevel=0, pen=pg.mkPen(ACCENT, width=1),
                                     brush=pg.mkBrush(ACCENT + "80"))
        self.addItem(self.curve)
        pen = pg.mkPen(THRESHOLD, width=2, style=Qt.PenStyle.DashLine)
        # both labels point inwards (never clipped at the plot's edge), at two heights (never overlapping)
        self.threshold_lines = [
            pg.InfiniteLine(angle=90, pen=pen, movable=False, label=label,
                            labelOpts={"position": height, "color": THRESHOLD, "anchors": [anchor, anchor],
                                       "fill": pg.mkBrush(255, 255, 255, 200)})
            for label, anchor, height in (("T {value:+.3g}", (-0.05, 0.5), 0.93),
                                          ("T {value:+.3g}", (1.05, 0.5), 0.82))]
        for line in self.threshold_lines:
            line.hide()
            self.addItem(line, ignoreBounds=True)
        self.markers = pg.PlotDataItem(pen=None, symbol="t", symbolSize=11, symbolBrush=MARKER,
                                       symbolPen=pg.mkPen("#333333"))
        self.addItem(self.markers)
        self.message = pg.TextItem("", color="#666666", anchor=(0.5, 0.5))
        self.addItem(self.message, ignoreBounds=True)
        self.counts = np.zeros(0)

    @property
    def has_data(self) -> bool:
        return self.counts.size > 0 and self.counts.sum() > 0

    def set_histogram(self, counts: np.ndarray, edges: np.ndarray) -> None:
        """counts [n] over edges [n + 1]; empty bins are drawn at the axis (a count of 1)."""
        self.counts = np.asarray(counts)
        if self.counts.size == 0:
            self.clear_data()
            return
        self.curve.setData(np.asarray(edges), np.maximum(self.counts, 1).astype(float))
        self.message.setText("")
        self.enableAutoRange()

    def clear_data(self, message: str = "") -> None:
        self.counts = np.zeros(0)
        self.curve.setData([], [])
        self.markers.setData([], [])
        self.set_thresholds(None)
        self.show_message(message)

    def show_message(self, text: str) -> None:
        """A line of text in the middle of the plot (why it is empty, what to do)."""
        self.message.setText(text)
        if text and not self.has_data:
            self.getViewBox().setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
            self.message.setPos(0.5, 0.5)

    def set_thresholds(self, threshold: float | None) -> None:
        for line, sign in zip(self.threshold_lines, (-1, 1)):
            if threshold is None or not np.isfinite(threshold):
                line.hide()
            else:
                line.show()
                line.setValue(sign * threshold)
                line.label.valueChanged()  # pyqtgraph skips the text of a label hidden at setValue (it read "T 0")

    def set_markers(self, xs) -> None:
        """Triangles at ``xs`` (e.g. one row's LUT centroids) above the tallest bar; None clears."""
        if xs is None or not self.has_data or len(xs) == 0:
            self.markers.setData([], [])
            return
        top = float(self.counts.max()) * 1.6
        self.markers.setData(np.asarray(xs, dtype=float), np.full(len(xs), top))


@dataclass(frozen=True)
class MatrixHistograms:
    """What the Inspect page draws for one matrix (computed off the GUI thread: ~70-100 ms each for the
    demo's largest matrix on a busy 2-core machine)."""

    weights: tuple[np.ndarray, np.ndarray]
    fisher: tuple[np.ndarray, np.ndarray, int] | None


def matrix_histograms(model, name: str, fisher: torch.Tensor | None) -> MatrixHistograms:
    """Histograms of matrix ``name``'s weights (an original's read from its file alone, a quantized
    model's effective weights) and of log10 of its Fisher values."""
    from studio.model_info import matrix_weight

    return MatrixHistograms(value_histogram(matrix_weight(model, name)),
                            log_histogram(fisher) if fisher is not None else None)
