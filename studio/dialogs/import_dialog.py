"""Import the original SqueezeLLM's packed checkpoint (.pt) into a quantized folder, then open it."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QPushButton, QWidget

from studio import storage
from studio.dialogs.common import JobDialog
from studio.widgets.pickers import PathPicker
from studio.dialogs.interop_jobs import IMPORT_STAGES, ImportOutcome, fresh_path, import_job
from studio.session import Session
from studio.workers import JobRunner

IMPORT_TITLE = "Importing a checkpoint"
DEFAULT_IMPORT_BASE = Path.home() / "squeeze-models"
INTRO = ("Convert a checkpoint packed by the original SqueezeLLM (e.g. <i>sq-llama-7b-w3-s0.pt</i>) into a "
         "folder this app opens, evaluates and exports. The base model is the original the checkpoint was made "
         "from: it gives the configuration, the tokenizer and any weights the file lacks. Files that would need "
         "to run code are refused.")
BASE_TIP = ("The original (dense) model the checkpoint was made from: 'demo', a model folder or a hub name "
            "(org/model). Leave it empty when config.json and the tokenizer sit beside the .pt file.")


class ImportDialog(JobDialog):
    """Checkpoint, base model and output folder; Import runs core's import in the worker, then the
    imported folder is loaded and handed on through ``imported``."""

    job_title = IMPORT_TITLE
    imported = Signal(str, object, object)  # spec, LoadedModel, ModelInfo

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(runner, "Import an original SqueezeLLM checkpoint", INTRO, "Import", parent)
        self.session = session
        self.checkpoint_picker = PathPicker(storage.IMPORT_CHECKPOINT, "Choose the original's packed checkpoint",
                                            "open", "PyTorch checkpoints (*.pt *.pth);;All files (*)")
        self.checkpoint_picker.setToolTip("The .pt file written by the original's pack.py")
        self.base_combo = QComboBox()
        self.base_combo.setEditable(True)
        self.base_combo.setToolTip(BASE_TIP)
        self.base_combo.lineEdit().setPlaceholderText("empty: config.json beside the checkpoint")
        self.base_folder_button = QPushButton("Folder…")
        self.base_folder_button.setToolTip("Choose the original model's folder")
        self.output_picker = PathPicker(storage.IMPORT_OUTPUT, "Where to write the imported folder", "folder",
                                        default_name=self._default_name)
        self.output_picker.setToolTip("A new folder; it appears only when the import has finished")
        self.overwrite_check = QCheckBox("Replace the folder if it already holds files")
        self._auto_output = ""
        base_row = QWidget()
        row = QHBoxLayout(base_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.base_combo, 1)
        row.addWidget(self.base_folder_button)
        self.form.addRow("Checkpoint (.pt)", self.checkpoint_picker)
        self.form.addRow("Base model", base_row)
        self.form.addRow("Output folder", self.output_picker)
        self.form.addRow("", self.overwrite_check)
        self.checkpoint_picker.changed.connect(self._on_checkpoint_changed)
        self.output_picker.changed.connect(self.update_actions)
        self.base_folder_button.clicked.connect(self._browse_base)
        self.refresh()

    def refresh(self) -> None:
        """Offer 'demo', the current original model and recent models as bases (keeps what is typed)."""
        typed = self.base_combo.currentText()
        choices = ["demo"]
        if self.session.has_dense_model:
            choices.insert(0, self.session.model.source)
        choices += [spec for spec in storage.recent_models() if spec not in choices]
        self.base_combo.clear()
        self.base_combo.addItems(choices)
        self.base_combo.setCurrentText(typed or choices[0])
        self.update_actions()

    def _default_name(self) -> str:
        return Path(self.checkpoint_picker.value()).stem or "imported"

    def _on_checkpoint_changed(self) -> None:
        """A new checkpoint gets a fresh output folder named after it, unless one was typed."""
        if self.output_picker.value() in ("", self._auto_output) and self.checkpoint_picker.value():
            where = Path(storage.last_folder(storage.IMPORT_OUTPUT, DEFAULT_IMPORT_BASE))
            self._auto_output = str(fresh_path(where, self._default_name()))
            self.output_picker.set_value(self._auto_output)
        self.update_actions()

    def _browse_base(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "The original model's folder", storage.last_folder("model"))
        if folder:
            storage.remember_folder("model", folder)
            self.base_combo.setCurrentText(folder)

    def form_ready(self) -> bool:
        return bool(self.checkpoint_picker.value() and self.output_picker.value())

    def start(self) -> bool:
        if not self.form_ready():
            return False
        checkpoint = str(Path(self.checkpoint_picker.value()).expanduser())
        base = self.base_combo.currentText().strip() or None
        output = str(Path(self.output_picker.value()).expanduser())
        overwrite = self.overwrite_check.isChecked()
        return self.run_job(lambda: import_job(checkpoint, base, output, overwrite), IMPORT_STAGES,
                            on_result=self._imported)

    def _imported(self, outcome: ImportOutcome) -> None:
        storage.remember_folder(storage.IMPORT_CHECKPOINT, Path(self.checkpoint_picker.value()).expanduser().parent)
        storage.remember_folder(storage.IMPORT_OUTPUT, outcome.path.parent)
        self._auto_output = self.output_picker.value()  # the next import gets a fresh name
        self._on_checkpoint_changed()
        self.show_result(f"<b>Imported into {outcome.path}</b>; it is now the current model.", outcome.path)
        self.imported.emit(str(outcome.path), outcome.loaded, outcome.info)
        self.accept()
