"""What every page shares: a title, a caption that explains the page, and action buttons that are
disabled while a conflicting job runs."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from studio.session import Session
from studio.workers import JobRunner


def caption(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("caption")
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    return label


def group(title: str, *widgets: QWidget, tooltip: str = "") -> QGroupBox:
    box = QGroupBox(title)
    box.setToolTip(tooltip)
    layout = QVBoxLayout(box)
    for widget in widgets:
        layout.addWidget(widget)
    return box


def align_form_labels(root: QWidget) -> None:
    """Give every label of the (nested) form layouts under ``root`` the width of the widest one, so
    that forms built from different configs line up as one."""
    labels = []
    for layout in [root.layout(), *(w.layout() for w in root.findChildren(QWidget))]:
        if isinstance(layout, QFormLayout):
            for row in range(layout.rowCount()):
                item = layout.itemAt(row, QFormLayout.ItemRole.LabelRole)
                if item is not None and isinstance(item.widget(), QLabel):
                    labels.append(item.widget())
    width = max((label.sizeHint().width() for label in labels), default=0)
    for label in labels:
        label.setMinimumWidth(width)


class Page(QWidget):
    """A page: subclasses build their widgets, then keep ``update_actions`` truthful."""

    title = ""
    description = ""

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.outer = QVBoxLayout(self)
        self.outer.setContentsMargins(18, 14, 18, 14)
        self.outer.setSpacing(10)
        heading = QLabel(self.title)
        heading.setObjectName("pageTitle")
        self.outer.addWidget(heading)
        self.outer.addWidget(caption(self.description))
        runner.busy_changed.connect(lambda _busy: self.update_actions())
        session.model_changed.connect(self.update_actions)

    def update_actions(self) -> None:
        """Enable exactly the actions that make sense now (override)."""

    def page_shown(self) -> None:
        """Called when the page becomes the visible one (override)."""
