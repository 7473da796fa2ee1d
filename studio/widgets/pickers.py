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


class FolderPicker(QWidget):
    """A folder path to write to (it need not exist yet).

    Browsing picks a place; when the chosen folder already holds files, ``default_name()`` is
    appended so that a new folder is created inside it.
    """

    changed = Signal()

    def __init__(self, kind: str, caption: str, default_name: Callable[[], str] | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.kind, self.caption, self.default_name = kind, caption, default_name
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

    def set_value(self, path: str) -> None:
        self.edit.setText(str(path))

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, self.caption, storage.last_folder(self.kind))
        if not path:
            return
        storage.remember_folder(self.kind, path)
        folder = Path(path)
        if self.default_name is not None and folder.is_dir() and any(folder.iterdir()):
            folder = folder / self.default_name()
        self.set_value(str(folder))
