"""pyqtgraph widgets: histograms with threshold lines, per-layer bars, heat map, Pareto scatter."""
