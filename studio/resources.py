"""Files shipped with the app (resources/ next to the studio package): icons and the stylesheet."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, Qt
from PySide6.QtGui import QIcon, QPainter, QPixmap
from PySide6.QtSvg import QSvgRenderer

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


ACCENT = "#2f6fb3"
ICON_PIXELS = 48


def _render(svg: str) -> QPixmap | None:
    renderer = QSvgRenderer(QByteArray(svg.encode()))
    if not renderer.isValid():
        return None
    pixmap = QPixmap(ICON_PIXELS, ICON_PIXELS)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    renderer.render(painter)
    painter.end()
    return pixmap


def icon(name: str) -> QIcon:
    """resources/icons/<name>.svg, drawn white when selected (on the accent colour); an empty icon when
    the file is missing or unreadable (never an error)."""
    path = RESOURCES / "icons" / f"{name}.svg"
    if not path.is_file():
        return QIcon()
    svg = path.read_text(encoding="utf-8")
    result = QIcon()
    for mode, text in ((QIcon.Mode.Normal, svg), (QIcon.Mode.Selected, svg.replace(ACCENT, "#ffffff"))):
        pixmap = _render(text)
        if pixmap is not None:
            result.addPixmap(pixmap, mode)
    return result


def stylesheet() -> str:
    """Every resources/styles/*.qss, concatenated in name order."""
    folder = RESOURCES / "styles"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.qss"))) if folder.is_dir() else ""
