"""Pickers for a text corpus and for a folder: a line of text plus a Browse button."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget

from studio import storage

CORPUS_CHOICES = (("builtin", "builtin (Wikipedia excerpt, offline)"),
                  ("wikitext2", "wikitext2 (needs the datasets package and network)"),
                  ("c4", "c4 (needs the datasets package and network)"))


class CorpusPicker(QWidget):
    """The text source of a calibration or evaluation: builtin, a dataset name, or a text file."""

    changed = Signal()

    def __init__(self, tooltip: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setEditable(True)
        for value, label in CORPUS_CHOICES:
            self.combo.addItem(value)
            self.combo.setItemData(self.combo.count() - 1, label, Qt.ItemDataRole.ToolTipRole)
        self.combo.setToolTip(tooltip)
        self.browse_button = QPushButton("Text file…")
        self.browse_button.setToolTip("Use a UTF-8 text file of your own")
        self.browse_button.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.browse_button)
        self.combo.currentTextChanged.connect(lambda _text: self.changed.emit())

    def value(self) -> str:
        return self.combo.currentText().strip() or "builtin"

    def set_value(self, source: str) -> None:
        self.combo.setCurrentText(str(source))

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a text file", storage.last_folder("corpus"),
                                              "Text files (*.txt *.md);;All files (*)")
        if path:
            storage.remember_folder("corpus", path)
            self.set_value(path)


class PathPicker(QWidget):
    """A path typed or browsed for. mode: "open" (an existing file), "folder" (a folder to write; a
    browsed folder that holds files gets ``default_name()`` appended) or "save" (a file to write).
    Browsing starts in, and remembers, the ``kind`` of folder (studio.storage)."""

    changed = Signal()

    def __init__(self, kind: str, caption_text: str, mode: str, file_filter: str = "",
                 default_name: Callable[[], str] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.kind, self.caption, self.mode, self.file_filter = kind, caption_text, mode, file_filter
        self.default_name = default_name
        self.edit = QLineEdit()
        self.browse_button = QPushButton("Browse…")
        self.browse_button.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit, 1)
        layout.addWidget(self.browse_button)
        self.edit.textChanged.connect(lambda _text: self.changed.emit())

    def value(self) -> str:
        return self.edit.text().strip()

    def set_value(self, path: str | Path) -> None:
        self.edit.setText(str(path))

    def set_mode(self, mode: str, file_filter: str = "") -> None:
        self.mode, self.file_filter = mode, file_filter

    def _browse(self) -> None:
        start = storage.last_folder(self.kind)
        if self.mode == "open":
            path, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.file_filter)
        elif self.mode == "save":
            path, _ = QFileDialog.getSaveFileName(self, self.caption, str(Path(start) / Path(self.value()).name),
                                                  self.file_filter)
        else:
            path = QFileDialog.getExistingDirectory(self, self.caption, start)
            if path and self.default_name is not None and any(Path(path).iterdir()):
                path = str(Path(path) / self.default_name())
        if path:
            storage.remember_folder(self.kind, Path(path) if Path(path).is_dir() else Path(path).parent)
            self.set_value(path)
