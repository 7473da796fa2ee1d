"""Files shipped with the app (resources/ next to the studio package): icons and the stylesheet."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QIcon

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def icon(name: str) -> QIcon:
    """resources/icons/<name>.svg, or an empty icon when it is missing (never an error)."""
    path = RESOURCES / "icons" / f"{name}.svg"
    return QIcon(str(path)) if path.is_file() else QIcon()


def stylesheet() -> str:
    """Every resources/styles/*.qss, concatenated in name order."""
    folder = RESOURCES / "styles"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.qss"))) if folder.is_dir() else ""
