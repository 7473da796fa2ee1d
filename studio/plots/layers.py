"""Whole-model views: per-layer bars of outlier % and sensitive %, and a blocks × modules heat map."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal

from core.models import block_index, short_module_name
from studio.plots.style import ACCENT, SECOND, style_plot

MAX_BLOCK_TICKS = 12


def _block_ticks(names: list[str]) -> list[tuple[float, str]]:
    """Ticks at the first layer of every k-th block, so that at most MAX_BLOCK_TICKS are drawn."""
    starts: list[tuple[int, int]] = []
    for i, name in enumerate(names):
        block = block_index(name)
        if not starts or starts[-1][1] != block:
            starts.append((i, block))
    step = max(1, int(np.ceil(len(starts) / MAX_BLOCK_TICKS)))
    return [(float(i), str(b)) for i, b in starts[::step]]


class LayerBars(pg.PlotWidget):
    """Two bars per quantizable layer, in model order: outlier % and sensitive % of that matrix."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        style_plot(self, "Per layer: share of weights kept exactly", "decoder block (its layers in model order)",
                   "% of the matrix")
        self.addLegend(offset=(10, 5), brush=pg.mkBrush(255, 255, 255, 210), labelTextColor="#333333")
        self.outlier_bars = pg.BarGraphItem(x=[], height=[], width=0.45, brush=ACCENT, pen=None, name="outliers")
        self.sensitive_bars = pg.BarGraphItem(x=[], height=[], width=0.45, brush=SECOND, pen=None,
                                              name="sensitive")
        self.addItem(self.outlier_bars)
        self.addItem(self.sensitive_bars)
        self.selection = pg.InfiniteLine(angle=90, pen=pg.mkPen("#555555", width=1, style=Qt.PenStyle.DotLine))
        self.selection.hide()
        self.addItem(self.selection, ignoreBounds=True)
        self.names: list[str] = []

    @property
    def bar_count(self) -> int:
        return len(self.names)

    def set_layers(self, names: list[str], outlier_percent: np.ndarray, sensitive_percent: np.ndarray) -> None:
        x = np.arange(len(names), dtype=float)
        self.names = list(names)
        self.outlier_bars.setOpts(x=x - 0.22, height=np.asarray(outlier_percent, dtype=float))
        self.sensitive_bars.setOpts(x=x + 0.22, height=np.asarray(sensitive_percent, dtype=float))
        self.getAxis("bottom").setTicks([_block_ticks(names)] if names else None)
        top = float(max(np.max(outlier_percent, initial=0), np.max(sensitive_percent, initial=0)))
        self.setXRange(-1, max(1, len(names)), padding=0)
        self.setYRange(0, max(top, 1e-3) * 1.6, padding=0)  # headroom for the legend

    def select(self, name: str | None) -> None:
        if name in self.names:
            self.selection.setValue(self.names.index(name))
            self.selection.show()
        else:
            self.selection.hide()


class LayerHeatMap(pg.PlotWidget):
    """Outlier % of each matrix as a grid: one row per block, one column per module kind.

    Clicking a cell emits ``matrix_clicked`` with the full name of that matrix.
    """

    matrix_clicked = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        style_plot(self, "Outliers by block and module (%)", "module", "block")
        self.image = pg.ImageItem(axisOrder="row-major")
        self.addItem(self.image)
        self.getViewBox().invertY(True)
        self.colorbar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), interactive=False, width=12)
        self.colorbar.setImageItem(self.image, insert_in=self.getPlotItem())
        self.cells: dict[tuple[int, int], str] = {}
        self.values = np.zeros((0, 0))
        self.scene().sigMouseClicked.connect(self._on_click)

    def set_layers(self, names: list[str], outlier_percent: np.ndarray) -> None:
        modules = list(dict.fromkeys(short_module_name(n) for n in names))
        blocks = sorted({block_index(n) for n in names})
        grid = np.full((len(blocks), len(modules)), np.nan)
        self.cells = {}
        for name, value in zip(names, outlier_percent):
            row, col = blocks.index(block_index(name)), modules.index(short_module_name(name))
            grid[row, col] = value
            self.cells[(row, col)] = name
        self.values = grid
        finite = grid[np.isfinite(grid)]
        high = float(finite.max()) if finite.size else 1.0
        self.image.setImage(np.nan_to_num(grid), levels=(0.0, max(high, 1e-6)))
        self.colorbar.setLevels((0.0, max(high, 1e-6)))
        self.getAxis("bottom").setTicks([[(i + 0.5, m) for i, m in enumerate(modules)]])
        step = max(1, int(np.ceil(len(blocks) / MAX_BLOCK_TICKS)))
        self.getAxis("left").setTicks([[(i + 0.5, str(b)) for i, b in enumerate(blocks)][::step]])
        self.getViewBox().autoRange(padding=0.02)

    def _on_click(self, event) -> None:
        point = self.getViewBox().mapSceneToView(event.scenePos())
        cell = (int(np.floor(point.y())), int(np.floor(point.x())))
        if cell in self.cells:
            self.matrix_clicked.emit(self.cells[cell])
