"""The quantization settings a person tunes: bits, outliers (target share or IQR range), sensitivity.

The same control serves the Inspect page (sliders, live readouts) and the Quantize page (spin
boxes, plus the method). Labels and tooltips come from ``core.config`` field metadata.
"""

from __future__ import annotations

import dataclasses

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QWidget
from superqt import QLabeledDoubleSlider

from core.config import METHODS, OutlierConfig, QuantConfig

MODE_PERCENT, MODE_RANGE, MODE_NONE = "percent", "range", "none"
MODE_LABELS = {MODE_PERCENT: "Target share of outliers", MODE_RANGE: "IQR range multiplier",
               MODE_NONE: "No outliers"}
MODE_TOOLTIP = ("How outliers are chosen: give the share of weights to keep exact (the range is solved for "
                "you), or the range directly, or keep none.")
# Slider spans: the useful part of what the configs allow.
RANGE_SPAN, PERCENT_SPAN, SENSITIVITY_SPAN = (0.5, 20.0), (0.0, 5.0), (0.0, 2.0)


def _meta(cls, name: str) -> dict:
    return dict(next(f for f in dataclasses.fields(cls) if f.name == name).metadata)


class QuantControls(QWidget):
    """Edits a QuantConfig; emits ``changed`` on every move. ``value()`` is always a valid config."""

    changed = Signal()

    def __init__(self, sliders: bool, show_method: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._config = QuantConfig()
        layout = self.form = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bits_combo = QComboBox()
        for bits in _meta(QuantConfig, "bits")["choices"]:
            self.bits_combo.addItem(f"{bits} bits", bits)
        self.method_combo = QComboBox()
        for method in METHODS:
            self.method_combo.addItem(method, method)
        self.mode_combo = QComboBox()
        for mode, label in MODE_LABELS.items():
            self.mode_combo.addItem(label, mode)
        self.range_edit = self._number(sliders, RANGE_SPAN, 0.1, 1)
        self.percent_edit = self._number(sliders, PERCENT_SPAN, 0.01, 2)
        self.sensitivity_edit = self._number(sliders, SENSITIVITY_SPAN, 0.01, 2)
        self._add(layout, _meta(QuantConfig, "bits"), self.bits_combo)
        if show_method:
            self._add(layout, _meta(QuantConfig, "method"), self.method_combo)
        self._add(layout, {"label": "Outliers", "tooltip": MODE_TOOLTIP}, self.mode_combo)
        self.range_label = self._add(layout, _meta(OutlierConfig, "range_multiplier"), self.range_edit)
        self.percent_label = self._add(layout, _meta(OutlierConfig, "percent"), self.percent_edit)
        self._add(layout, _meta(QuantConfig, "sensitivity_percent"), self.sensitivity_edit)
        self.set_value(self._config)
        for combo in (self.bits_combo, self.method_combo, self.mode_combo):
            combo.currentIndexChanged.connect(self._on_edit)
        for edit in (self.range_edit, self.percent_edit, self.sensitivity_edit):
            edit.valueChanged.connect(self._on_edit)

    @staticmethod
    def _number(sliders: bool, span: tuple[float, float], step: float, decimals: int) -> QWidget:
        edit = QLabeledDoubleSlider(Qt.Orientation.Horizontal) if sliders else QDoubleSpinBox()
        edit.setRange(*span)
        edit.setSingleStep(step)
        edit.setDecimals(decimals)
        return edit

    @staticmethod
    def _add(layout: QFormLayout, meta: dict, editor: QWidget) -> QLabel:
        label = QLabel(meta.get("label", ""))
        for widget in (label, editor):
            widget.setToolTip(meta.get("tooltip", ""))
        layout.addRow(label, editor)
        return label

    # ------------------------------------------------------------ values

    def mode(self) -> str:
        return self.mode_combo.currentData()

    def value(self) -> QuantConfig:
        mode = self.mode()
        outliers = OutlierConfig(
            range_multiplier=round(self.range_edit.value(), 3) if mode == MODE_RANGE else None,
            percent=round(self.percent_edit.value(), 4) if mode == MODE_PERCENT else None)
        return dataclasses.replace(self._config, bits=self.bits_combo.currentData(),
                                   method=self.method_combo.currentData(), outliers=outliers,
                                   sensitivity_percent=round(self.sensitivity_edit.value(), 4))

    def set_value(self, config: QuantConfig) -> None:
        """Show ``config`` without emitting ``changed``."""
        self._config = config
        outliers = config.outliers
        mode = MODE_RANGE if outliers.range_multiplier is not None else \
            MODE_PERCENT if outliers.percent is not None else MODE_NONE
        widgets = (self.bits_combo, self.method_combo, self.mode_combo, self.range_edit,
                   self.percent_edit, self.sensitivity_edit)
        for widget in widgets:
            widget.blockSignals(True)
        try:
            self.bits_combo.setCurrentIndex(max(0, self.bits_combo.findData(config.bits)))
            self.method_combo.setCurrentIndex(max(0, self.method_combo.findData(config.method)))
            self.mode_combo.setCurrentIndex(max(0, self.mode_combo.findData(mode)))
            if outliers.range_multiplier is not None:
                self.range_edit.setValue(outliers.range_multiplier)
            if outliers.percent is not None:
                self.percent_edit.setValue(outliers.percent)
            self.sensitivity_edit.setValue(config.sensitivity_percent)
        finally:
            for widget in widgets:
                widget.blockSignals(False)
        self._show_mode_fields()

    def _show_mode_fields(self) -> None:
        mode = self.mode()
        squeeze = self.method_combo.currentData() == "squeezellm"
        self.form.setRowVisible(self.range_edit, mode == MODE_RANGE)
        self.form.setRowVisible(self.percent_edit, mode == MODE_PERCENT)
        for widget in (self.mode_combo, self.range_edit, self.percent_edit, self.sensitivity_edit):
            widget.setEnabled(squeeze)

    def _on_edit(self, *_args) -> None:
        self._show_mode_fields()
        self.changed.emit()
