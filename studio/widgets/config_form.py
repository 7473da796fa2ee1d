"""A form built from a config dataclass's field metadata (label, min, max, step, tooltip, choices).

bool fields become check boxes.

``core.config`` describes each setting once; this turns it into spin boxes, combo boxes and line
edits with the tooltip on both label and editor. ``value()`` rebuilds the frozen config (its own
validation decides what is allowed) and shows the ``ValueError`` message inline when it refuses.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QSpinBox,
                               QWidget)

EditorFactory = Callable[[dict], QWidget]


def _unwrap_optional(hint) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field annotation such as ``float | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(hint):
        return args[0], True
    return hint, False


def _decimals(step: float) -> int:
    return max(1, min(6, -int(math.floor(math.log10(step))) if step < 1 else 1))


class ConfigForm(QWidget):
    """Editors for some fields of a config dataclass; emits ``changed`` on every edit.

    fields: the field names to show, in order (default: every plain int/float/str field).
    custom: field name -> factory(metadata) for a widget with value(), set_value() and a ``changed``
    signal (e.g. a corpus picker); other fields of the config keep the value given to set_value().
    """

    changed = Signal()

    def __init__(self, config, fields: list[str] | None = None,
                 custom: dict[str, EditorFactory] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.cls = type(config)
        self._config = config
        self._hints = typing.get_type_hints(self.cls)
        self._fields = {f.name: f for f in dataclasses.fields(self.cls)}
        names = fields or [n for n in self._fields if _unwrap_optional(self._hints[n])[0] in (int, float, str)]
        self.editors: dict[str, QWidget] = {}
        self.labels: dict[str, QLabel] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for name in names:
            meta = dict(self._fields[name].metadata)
            factory = (custom or {}).get(name)
            kind, optional = _unwrap_optional(self._hints[name])
            editor = factory(meta) if factory else self._editor_for(meta, kind, optional)
            editor.setObjectName(f"field_{name}")
            label = QLabel(meta.get("label", name.replace("_", " ").capitalize()))
            for widget in (label, editor):
                widget.setToolTip(meta.get("tooltip", ""))
            layout.addRow(label, editor)
            self.editors[name], self.labels[name] = editor, label
        self.error_label = QLabel()
        self.error_label.setObjectName("formError")
        self.error_label.setWordWrap(True)
        self.error_label.hide()
        layout.addRow(self.error_label)
        self.set_value(config)
        for editor in self.editors.values():
            self._connect(editor)

    def _editor_for(self, meta: dict, kind: type = str, optional: bool = False) -> QWidget:
        choices = meta.get("choices")
        if choices:
            combo = QComboBox()
            for choice in choices:
                combo.addItem(str(choice), choice)
            return combo
        if kind is bool:
            return QCheckBox()
        if kind is int:
            spin = QSpinBox()
            low = int(meta.get("min", 0))
            spin.setRange(low - 1 if optional else low, int(meta.get("max", 2**31 - 1)))
            if optional:
                spin.setSpecialValueText("off")
            spin.setSingleStep(int(meta.get("step", 1)))
            return spin
        if kind is float:
            spin = QDoubleSpinBox()
            step = float(meta.get("step", 0.01))
            spin.setDecimals(_decimals(step))
            low = float(meta.get("min", 0.0))
            spin.setRange(low - step if optional else low, float(meta.get("max", 1e9)))
            spin.setSingleStep(step)
            if optional:  # the lowest position means "not set" (None)
                spin.setSpecialValueText("off")
            return spin
        return QLineEdit()

    def _connect(self, editor: QWidget) -> None:
        for signal in ("valueChanged", "currentIndexChanged", "textChanged", "toggled", "changed"):
            if hasattr(editor, signal):
                getattr(editor, signal).connect(self._on_edit)
                return

    def _on_edit(self, *_args) -> None:
        self.changed.emit()

    # ------------------------------------------------------------ values

    @staticmethod
    def _read(editor: QWidget):
        if isinstance(editor, QComboBox):
            return editor.currentData()
        if isinstance(editor, QCheckBox):
            return editor.isChecked()
        if isinstance(editor, QLineEdit):
            return editor.text().strip()
        if isinstance(editor, (QSpinBox, QDoubleSpinBox)) and editor.specialValueText() \
                and editor.value() == editor.minimum():
            return None
        return editor.value()  # spin boxes and custom editors

    @staticmethod
    def _write(editor: QWidget, value) -> None:
        editor.blockSignals(True)
        try:
            if isinstance(editor, (QSpinBox, QDoubleSpinBox)):
                editor.setValue(editor.minimum() if value is None else value)
            elif isinstance(editor, QComboBox):
                index = editor.findData(value)
                editor.setCurrentIndex(max(0, index))
            elif isinstance(editor, QLineEdit):
                editor.setText(str(value))
            elif isinstance(editor, QCheckBox):
                editor.setChecked(bool(value))
            else:
                editor.set_value(value)
        finally:
            editor.blockSignals(False)

    def set_value(self, config) -> None:
        """Show ``config`` without emitting ``changed``."""
        self._config = config
        for name, editor in self.editors.items():
            self._write(editor, getattr(config, name))
        self.error_label.hide()

    def value(self):
        """The config the form shows, or None (with the reason shown under the form) if it is invalid."""
        changes = {name: self._read(editor) for name, editor in self.editors.items()}
        try:
            config = dataclasses.replace(self._config, **changes)
        except ValueError as exc:
            self.error_label.setText(str(exc))
            self.error_label.show()
            return None
        self.error_label.hide()
        return config
