"""Chat page: talk to the original or a quantized result, or to both side by side with the same prompt."""

from __future__ import annotations

import dataclasses

from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from core.chat import ChatSession
from core.config import ChatConfig
from studio.jobs import chat_job
from studio.pages.base import Page, group
from studio.widgets.config_form import ConfigForm
from studio.widgets.transcript import Transcript

CHAT_TITLE = "Chatting"
MODE_ORIGINAL, MODE_QUANTIZED, MODE_SIDE_BY_SIDE = "original", "quantized", "side"
MODES = ((MODE_ORIGINAL, "The original"), (MODE_QUANTIZED, "A quantized result"),
         (MODE_SIDE_BY_SIDE, "Side by side: original and quantized"))
SIDES = ("left", "right")


class ChatPage(Page):
    title = "Chat"
    description = ("Talk to the model to judge the result by feel. Side by side sends the same message to the "
                   "original and to a quantized result, so you can compare their answers and speed. Replies "
                   "stream as they are generated; Stop ends them early.")

    def __init__(self, session, runner, parent: QWidget | None = None) -> None:
        super().__init__(session, runner, parent)
        self.chats = {side: ChatSession() for side in SIDES}
        self._stop_requested = False
        self.mode_combo = QComboBox()
        for mode, label in MODES:
            self.mode_combo.addItem(label, mode)
        self.mode_combo.setToolTip("Who answers")
        self.result_combo = QComboBox()
        self.result_combo.setToolTip("Which quantized result answers")
        self.system_edit = QPlainTextEdit()
        self.system_edit.setPlaceholderText("Optional: instructions the model sees before the conversation")
        self.system_edit.setToolTip(next(f for f in dataclasses.fields(ChatConfig)
                                         if f.name == "system_prompt").metadata["tooltip"])
        self.system_edit.setMaximumHeight(70)
        self.settings_form = ConfigForm(session.chat_config,
                                        ["temperature", "top_p", "max_new_tokens", "repetition_penalty"])
        self.transcripts = {side: Transcript() for side in SIDES}
        self.titles = {side: QLabel() for side in SIDES}
        self.stats_labels = {side: QLabel("") for side in SIDES}
        self.input_edit = QPlainTextEdit()
        self.input_edit.setPlaceholderText("Type a message; Ctrl+Enter sends")
        self.input_edit.setMaximumHeight(90)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("primary")
        self.send_button.setToolTip("Send the message (Ctrl+Enter)")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("End the reply now; what was written so far stays in the conversation")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Forget the conversation and start a new one")
        self._layout()
        self._connect()
        self._refresh_targets()

    def _layout(self) -> None:
        who = QWidget()
        form = QFormLayout(who)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Answered by", self.mode_combo)
        form.addRow("Quantized result", self.result_combo)
        form.addRow("System prompt", self.system_edit)
        left = QWidget()
        column = QVBoxLayout(left)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(group("Conversation", who))
        column.addWidget(group("Generation", self.settings_form))
        column.addStretch(1)
        panes = QGridLayout()
        for c, side in enumerate(SIDES):
            self.titles[side].setObjectName("paneTitle")
            self.stats_labels[side].setObjectName("paneStats")
            panes.addWidget(self.titles[side], 0, c)
            panes.addWidget(self.transcripts[side], 1, c)
            panes.addWidget(self.stats_labels[side], 2, c)
        buttons = QVBoxLayout()
        for button in (self.send_button, self.stop_button, self.clear_button):
            buttons.addWidget(button)
        entry = QHBoxLayout()
        entry.addWidget(self.input_edit, 1)
        entry.addLayout(buttons)
        right = QWidget()
        right_column = QVBoxLayout(right)
        right_column.setContentsMargins(0, 0, 0, 0)
        right_column.addLayout(panes, 1)
        right_column.addLayout(entry)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setSizes([320, 900])
        self.outer.addWidget(splitter, 1)

    def _connect(self) -> None:
        self.mode_combo.currentIndexChanged.connect(lambda _i: self._on_target_changed())
        self.result_combo.currentIndexChanged.connect(lambda _i: self._on_target_changed())
        self.session.model_changed.connect(self._refresh_targets)
        self.session.results_changed.connect(self._refresh_targets)
        self.settings_form.changed.connect(self._on_settings_edited)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.clear_button.clicked.connect(self.clear)
        QShortcut(QKeySequence("Ctrl+Return"), self.input_edit, activated=self.send)

    # ------------------------------------------------------------ who answers

    def _refresh_targets(self) -> None:
        current = self.result_combo.currentData()
        self.result_combo.blockSignals(True)
        self.result_combo.clear()
        for result in self.session.results:
            self.result_combo.addItem(result.name, str(result.path))
        index = self.result_combo.findData(current)
        self.result_combo.setCurrentIndex(index if index >= 0 else self.result_combo.count() - 1)
        self.result_combo.blockSignals(False)
        mode = self.mode_combo.currentData()
        if mode == MODE_ORIGINAL and not self.session.has_dense_model and self.session.results:
            self.mode_combo.setCurrentIndex(self.mode_combo.findData(MODE_QUANTIZED))
        self._on_target_changed()

    def select_mode(self, mode: str) -> None:
        self.mode_combo.setCurrentIndex(self.mode_combo.findData(mode))

    def _models(self) -> dict:
        """side -> LoadedModel for the chosen mode (missing models are left out)."""
        original = self.session.model if self.session.has_dense_model else None
        result = next((r.loaded for r in self.session.results if str(r.path) == self.result_combo.currentData()),
                      None)
        mode = self.mode_combo.currentData()
        chosen = {MODE_ORIGINAL: {"left": original}, MODE_QUANTIZED: {"left": result},
                  MODE_SIDE_BY_SIDE: {"left": original, "right": result}}[mode]
        return {side: loaded for side, loaded in chosen.items() if loaded is not None}

    def _on_target_changed(self) -> None:
        side_by_side = self.mode_combo.currentData() == MODE_SIDE_BY_SIDE
        for widget in (self.titles["right"], self.transcripts["right"], self.stats_labels["right"]):
            widget.setVisible(side_by_side)
        self.result_combo.setEnabled(self.mode_combo.currentData() != MODE_ORIGINAL)
        models = self._models()
        for side in SIDES:
            loaded = models.get(side)
            self.titles[side].setText(loaded.name + (" (quantized)" if loaded.quantized else " (original)")
                                      if loaded is not None else "(no model: open or quantize one first)")
        self.clear()
        self.update_actions()

    def _on_settings_edited(self) -> None:
        config = self.settings_form.value()
        if config is not None:
            self.session.chat_config = config

    # ------------------------------------------------------------ talking

    def send(self) -> bool:
        text = self.input_edit.toPlainText().strip()
        models = self._models()
        settings = self.settings_form.value()
        if not text or not models or settings is None or self.runner.busy:
            return False
        config = dataclasses.replace(settings, system_prompt=self.system_edit.toPlainText().strip())
        sides = {}
        for side, loaded in models.items():
            chat = self.chats[side]
            chat.set_system(config.system_prompt)
            sides[side] = (loaded, chat)
            self.transcripts[side].add_user(text)
            self.transcripts[side].start_reply(loaded.name)
            self.stats_labels[side].setText("generating…")
        self._stop_requested = False
        self.input_edit.clear()
        return self.runner.run(CHAT_TITLE, lambda: chat_job(sides, text, config, lambda: self._stop_requested),
                               on_yield=self._on_piece, on_result=self._on_stats, on_end=self._ended)

    def stop(self) -> None:
        """Finish the replies at the next token (they keep what was written)."""
        self._stop_requested = True

    def clear(self) -> None:
        if self.runner.busy and self.runner.title == CHAT_TITLE:
            return
        for side in SIDES:
            self.chats[side].reset()
            self.transcripts[side].clear()
            self.stats_labels[side].setText("")

    def _on_piece(self, piece) -> None:
        self.transcripts[piece.side].append(piece.text)

    def _on_stats(self, results: dict) -> None:
        for side, (stats, seconds) in results.items():
            speed = stats.tokens / max(seconds, 1e-9)
            ending = {"eos": "finished", "length": "reached the length limit", "stopped": "stopped"}.get(
                stats.finish_reason, stats.finish_reason)
            self.stats_labels[side].setText(f"{stats.tokens} tokens in {seconds:.1f} s: "
                                            f"<b>{speed:.1f} tokens/s</b> ({ending})")

    def _ended(self, outcome: str) -> None:
        if outcome != "done":
            for side in SIDES:
                if self.stats_labels[side].text() == "generating…":
                    self.stats_labels[side].setText(outcome)
        self.update_actions()

    def update_actions(self) -> None:
        chatting = self.runner.busy and self.runner.title == CHAT_TITLE
        self.send_button.setEnabled(not self.runner.busy and bool(self._models()))
        self.stop_button.setEnabled(chatting)
        self.clear_button.setEnabled(not chatting)
        for widget in (self.mode_combo, self.result_combo, self.settings_form, self.system_edit):
            widget.setEnabled(not chatting)
        if not chatting:
            self.result_combo.setEnabled(self.mode_combo.currentData() != MODE_ORIGINAL)
