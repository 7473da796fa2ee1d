"""One look for every plot: light background, the app's accent colours, readable labels."""

from __future__ import annotations

import pyqtgraph as pg

ACCENT = "#2f6fb3"
SECOND = "#e08a1e"
THRESHOLD = "#c0392b"
MARKER = "#27ae60"
BACKGROUND = "#ffffff"
FOREGROUND = "#333333"


def style_plot(widget: pg.PlotWidget, title: str, x_label: str, y_label: str) -> None:
    widget.setBackground(BACKGROUND)
    item = widget.getPlotItem()
    item.setTitle(title, color=FOREGROUND, size="10pt")
    for side, text in (("bottom", x_label), ("left", y_label)):
        axis = item.getAxis(side)
        axis.setPen(pg.mkPen(FOREGROUND))
        axis.setTextPen(pg.mkPen(FOREGROUND))
        axis.setLabel(text, color=FOREGROUND)
        axis.enableAutoSIPrefix(False)  # "x0.001" on an axis confuses more than it helps
    item.showGrid(x=True, y=True, alpha=0.15)
    widget.setMinimumHeight(180)
    item.setMenuEnabled(False)
