"""A chat transcript that grows piece by piece while a reply streams."""

from __future__ import annotations

import html

from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QTextBrowser

USER_COLOR, MODEL_COLOR, NOTE_COLOR = "#2f6fb3", "#1e7a46", "#888888"


class Transcript(QTextBrowser):
    """Messages as blocks: ``add_user``, then ``start_reply`` and ``append`` pieces, then ``end_reply``."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        self.reply_text = ""

    def _append_html(self, markup: str) -> None:
        self.moveCursor(QTextCursor.MoveOperation.End)
        self.insertHtml(markup)
        self.moveCursor(QTextCursor.MoveOperation.End)

    def add_user(self, text: str) -> None:
        if not self.document().isEmpty():
            self._append_html("<br><br>")
        self._append_html(f"<b style='color:{USER_COLOR}'>You</b><br>{html.escape(text)}".replace("\n", "<br>"))

    def start_reply(self, name: str) -> None:
        self.reply_text = ""
        self._append_html(f"<br><br><b style='color:{MODEL_COLOR}'>{html.escape(name)}</b><br>")

    def append(self, piece: str) -> None:
        """Add streamed text as plain text (a model's output is never interpreted as markup)."""
        self.reply_text += piece
        self.moveCursor(QTextCursor.MoveOperation.End)
        self.insertPlainText(piece)
        self.ensureCursorVisible()

    def end_reply(self, note: str) -> None:
        self._append_html(f"<br><span style='color:{NOTE_COLOR}'><i>{html.escape(note)}</i></span>")
