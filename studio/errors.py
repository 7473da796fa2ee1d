"""Errors reach the user as a clear message, and tracebacks go to a log file.

A ``UserError`` already names the problem and the fix, so it is shown as is. Running out of
memory gets its own advice. Anything else is a bug: the user sees a short "unexpected error"
line and where the full traceback was written.
"""

from __future__ import annotations

import datetime
import logging
import traceback

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QMessageBox, QWidget

from core.errors import UserError, describe_memory_error
from studio import storage

def log_exception(exc: BaseException, action: str) -> str:
    """Append the traceback of ``exc`` to the studio log; returns the log's path."""
    path = storage.log_file()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"\n[{stamp}] while {action}:\n{text}")
    return str(path)


def user_message(exc: BaseException, action: str) -> str:
    """What the user reads about ``exc``; unexpected errors are logged with their traceback."""
    if isinstance(exc, UserError):
        return str(exc)
    memory = describe_memory_error(exc)  # the same line the command line prints
    if memory is not None:
        log_exception(exc, action)
        return f"{memory[0].upper()}{memory[1:]}.\n\n({type(exc).__name__} while {action})"
    path = log_exception(exc, action)
    return (f"Unexpected error while {action}: {type(exc).__name__}: {exc}\n\n"
            f"This is a bug in Squeeze Studio, not in your input. The full details were written to {path}.")


class ErrorReporter(QObject):
    """Shows errors in a non-blocking message box over the main window.

    ``shown`` carries the message (tests wait on it); ``last_message`` keeps the latest one.
    """

    shown = Signal(str)

    def __init__(self, parent_widget: QWidget | None = None) -> None:
        super().__init__(parent_widget)
        self.parent_widget = parent_widget
        self.last_message = ""
        self.last_dialog: QMessageBox | None = None

    def report(self, exc: BaseException, action: str) -> None:
        message = user_message(exc, action)
        if isinstance(exc, UserError):
            logging.getLogger("studio").info("user error while %s: %s", action, exc)
        self.show_message(f"Could not finish {action}", message)

    def show_message(self, title: str, message: str) -> None:
        dialog = QMessageBox(QMessageBox.Icon.Warning, "Squeeze Studio", title, QMessageBox.StandardButton.Ok,
                             self.parent_widget)
        dialog.setInformativeText(message)
        dialog.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.setObjectName("errorDialog")
        dialog.open()  # window-modal but non-blocking: the app keeps running
        self.last_dialog = dialog
        self.last_message = message
        self.shown.emit(message)
