"""Size against perplexity for every evaluation run; the best trade-offs joined by a line."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Signal

from studio.plots.style import ACCENT, SECOND, THRESHOLD, style_plot


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and perplexity, by increasing size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


class ParetoPlot(pg.PlotWidget):
    """One point per run (size in MB, perplexity); clicking a point emits ``run_clicked(run_id)``."""

    run_clicked = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        style_plot(self, "Size vs perplexity (lower left is better)", "size (MB)", "perplexity")
        self.front = pg.PlotDataItem(pen=pg.mkPen(SECOND, width=1.5))
        self.addItem(self.front)
        self.scatter = pg.ScatterPlotItem(size=12, pen=pg.mkPen("#333333"), brush=pg.mkBrush(ACCENT), hoverable=True)
        self.scatter.sigClicked.connect(self._on_clicked)
        self.addItem(self.scatter)
        self.labels: list[pg.TextItem] = []
        self.run_ids: list[str] = []
        self.selected: str | None = None

    @property
    def point_count(self) -> int:
        return len(self.run_ids)

    def set_runs(self, runs: list[dict]) -> None:
        """runs: dicts with id, label, size_mb, perplexity."""
        for label in self.labels:
            self.removeItem(label)
        self.labels = []
        usable = [r for r in runs if r.get("perplexity") is not None and r.get("size_mb") is not None]
        self.run_ids = [r["id"] for r in usable]
        spots = [{"pos": (r["size_mb"], r["perplexity"]), "data": r["id"]} for r in usable]
        self.scatter.setData(spots)
        points = [(r["size_mb"], r["perplexity"]) for r in usable]
        front = pareto_front(points)
        self.front.setData([points[i][0] for i in front], [points[i][1] for i in front])
        for run in usable:
            text = pg.TextItem(run["label"], color="#333333", anchor=(0, 1.2))
            text.setPos(run["size_mb"], run["perplexity"])
            self.addItem(text)
            self.labels.append(text)
        self.select(self.selected)
        if points:  # room around the points for their labels
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            pad_x, pad_y = max(1.0, 0.25 * (max(xs) - min(xs))), max(0.05, 0.25 * (max(ys) - min(ys)))
            self.setXRange(min(xs) - pad_x, max(xs) + pad_x, padding=0)
            self.setYRange(min(ys) - pad_y, max(ys) + pad_y, padding=0)

    def select(self, run_id: str | None) -> None:
        """Highlight one run (None: none)."""
        self.selected = run_id
        brushes = [pg.mkBrush(THRESHOLD if rid == run_id else ACCENT) for rid in self.run_ids]
        sizes = [16 if rid == run_id else 11 for rid in self.run_ids]
        if self.run_ids:
            self.scatter.setBrush(brushes)
            self.scatter.setSize(sizes)

    def _on_clicked(self, _item, points, _event=None) -> None:
        if len(points):
            self.run_clicked.emit(str(points[0].data()))

