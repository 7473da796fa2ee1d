"""What the studio remembers between runs: settings, recent models, last folders, the runs table.

Settings live in QSettings; the runs table and the error log live in the user's data folder
(``QStandardPaths.AppDataLocation``). ``$SQUEEZE_STUDIO_HOME`` moves both into one folder, so
tests and screenshots never touch a person's real settings.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths

ORGANIZATION = "squeeze-studio"
APPLICATION = "Squeeze Studio"
MAX_RECENT = 8
RUNS_FILE = "runs.json"
LOG_FILE = "studio.log"
# kinds of remembered folders (last_folder / remember_folder) besides "model", "output", "corpus"
IMPORT_CHECKPOINT = "import_checkpoint"  # where the original's .pt files were picked
IMPORT_OUTPUT = "import_output"  # where imported folders were written
EXPORT_OUTPUT = "export_output"  # where exports were written


def _home_override() -> Path | None:
    home = os.environ.get("SQUEEZE_STUDIO_HOME")
    return Path(home).expanduser() if home else None


def data_dir() -> Path:
    """The user's data folder for the studio (created on demand)."""
    override = _home_override()
    if override is not None:
        folder = override / "data"
    else:
        location = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
        folder = Path(location) if location else Path.home() / ".local" / "share" / "squeeze-studio"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def log_file() -> Path:
    return data_dir() / LOG_FILE


def settings() -> QSettings:
    """The studio's QSettings (an ini file under $SQUEEZE_STUDIO_HOME when it is set)."""
    override = _home_override()
    if override is not None:
        override.mkdir(parents=True, exist_ok=True)
        return QSettings(str(override / "settings.ini"), QSettings.Format.IniFormat)
    return QSettings(ORGANIZATION, APPLICATION)


def _string_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # QSettings' ini backend returns a one-item list as a plain string
        return [value] if value else []
    return [str(v) for v in value]


def recent_models() -> list[str]:
    """Model specs opened before, most recent first."""
    return _string_list(settings().value("recent_models"))


def remember_model(spec: str) -> list[str]:
    """Put ``spec`` first in the recent models (at most MAX_RECENT) and return the new list."""
    recent = [spec] + [s for s in recent_models() if s != spec]
    recent = recent[:MAX_RECENT]
    settings().setValue("recent_models", recent)
    return recent


def forget_model(spec: str) -> None:
    settings().setValue("recent_models", [s for s in recent_models() if s != spec])


def last_folder(kind: str, default: str | Path | None = None) -> str:
    """The folder a file dialog of this kind opened last (``default``, else home, when none)."""
    value = settings().value(f"last_folder/{kind}")
    return str(value) if value else str(default or Path.home())


def remember_folder(kind: str, path: str | Path) -> None:
    path = Path(path)
    settings().setValue(f"last_folder/{kind}", str(path if path.is_dir() else path.parent))


class RunsStore:
    """The evaluation runs table, kept as JSON in the data folder (a list of dicts)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / RUNS_FILE

    def load(self) -> list[dict]:
        """The saved runs; a missing or damaged file gives an empty table (never an error)."""
        try:
            runs = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [run for run in runs if isinstance(run, dict)] if isinstance(runs, list) else []

    def save(self, runs: list[dict]) -> None:
        """Write atomically: a crash leaves the old table, never half of a new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".runs-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(runs, stream, indent=1)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
