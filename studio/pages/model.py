"""Model page: open a model (demo, folder, GGUF file, quantized folder, hub name) and see what it is."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio import storage
from studio.dialogs.export_dialog import ExportDialog
from studio.dialogs.import_dialog import ImportDialog
from studio.format import human_bytes, human_count
from studio.jobs import LOAD_STAGES, load_job
from studio.model_info import ModelInfo
from studio.pages.base import Page, group

LOAD_TITLE = "Loading the model"
FACTS = (("name", "Name"), ("source", "Opened from"), ("architecture", "Architecture"),
         ("parameters", "Parameters"), ("blocks", "Decoder blocks"), ("quantizable", "Quantizable matrices"),
         ("stored", "Stored as"), ("memory", "Memory now"), ("estimate4", "Estimated at 4 bits"),
         ("estimate3", "Estimated at 3 bits"), ("plan", "Quantizing needs"))
FACT_TIPS = {"stored": "The weights' dtype in the files, the model's size in it, and the weight files on disk.",
             "memory": "Bytes of the model's tensors in memory now. An original is opened without its weights: "
                       "pages read what they need from the files (a matrix for a histogram, one at a time for "
                       "the statistics) and Evaluate and Chat load it whole in its stored dtype.",
             "estimate4": "Whole model after 4-bit SqueezeLLM with the default 0.5% of weights kept exactly.",
             "estimate3": "Whole model after 3-bit SqueezeLLM with the default 0.5% of weights kept exactly.",
             "plan": "The memory a quantization run holds at its peak, one decoder block at a time, with the "
                     "calibration setting of the Quantize page (block inputs that do not fit go to disk)."}


class ModelPage(Page):
    title = "Model"
    description = ("Open the model you want to shrink. The demo model (SmolLM2-135M, a small chat model) "
                   "works offline. You can also open a Hugging Face model folder, a single .gguf file, a "
                   "folder quantized earlier by this app, or a hub name like org/model.")

    model_loaded = Signal()

    def __init__(self, session, runner, parent: QWidget | None = None) -> None:
        super().__init__(session, runner, parent)
        self.demo_button = QPushButton("Open the demo model")
        self.demo_button.setObjectName("primary")
        self.demo_button.setToolTip("SmolLM2-135M-Instruct, shipped with the app (Ctrl+D)")
        self.open_folder_button = QPushButton("Open folder…")
        self.open_folder_button.setToolTip("A folder with config.json and .safetensors weights, or a folder "
                                           "quantized by Squeeze Studio (Ctrl+O)")
        self.open_gguf_button = QPushButton("Open GGUF file…")
        self.open_gguf_button.setToolTip("A single .gguf file (its weights are dequantized to float32)")
        self.spec_edit = QLineEdit()
        self.spec_edit.setPlaceholderText("or type a path or hub name (org/model) and press Enter")
        self.open_button = QPushButton("Open")
        self.import_action = QAction("&Import original checkpoint…", self)
        self.import_action.setToolTip("Convert a .pt packed by the original SqueezeLLM into a folder and open it")
        self.export_action = QAction("&Export…", self)
        self.export_action.setToolTip("Write a quantized model as squeezellm-pt (vLLM), a dense HF folder or GGUF")
        self.import_button = QPushButton("Import original checkpoint…")
        self.export_button = QPushButton("Export…")
        for button, action in ((self.import_button, self.import_action), (self.export_button, self.export_action)):
            button.setToolTip(action.toolTip())
            button.clicked.connect(action.trigger)
        self.import_dialog: ImportDialog | None = None
        self.export_dialog: ExportDialog | None = None
        self.recent_list = QListWidget()
        self.recent_list.setToolTip("Models opened before: double-click to open again")
        self.recent_list.setMaximumHeight(130)
        self.facts: dict[str, QLabel] = {}
        self.layers_table = QTableWidget(0, 4)
        self.layers_table.setHorizontalHeaderLabels(["Matrix", "Shape (out × in)", "Parameters", "Stored as"])
        self.layers_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.layers_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.layers_table.verticalHeader().hide()
        self.layers_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self._layout()
        self.demo_button.clicked.connect(lambda: self.open_model("demo"))
        self.open_folder_button.clicked.connect(self.browse_folder)
        self.open_gguf_button.clicked.connect(self.browse_gguf)
        self.open_button.clicked.connect(self._open_typed)
        self.spec_edit.returnPressed.connect(self._open_typed)
        self.recent_list.itemActivated.connect(lambda item: self.open_model(item.text()))
        self.import_action.triggered.connect(self.show_import_dialog)
        self.export_action.triggered.connect(self.show_export_dialog)
        session.results_changed.connect(self.update_actions)
        session.model_changed.connect(lambda: self.show_info(self.session.info))
        session.calibration_changed.connect(self._show_plan)
        session.quant_config_changed.connect(self._show_plan)
        self.refresh_recent()
        self.show_info(None)
        self.update_actions()

    def _layout(self) -> None:
        buttons = QHBoxLayout()
        for button in (self.demo_button, self.open_folder_button, self.open_gguf_button):
            buttons.addWidget(button)
        buttons.addWidget(self.spec_edit, 1)
        buttons.addWidget(self.open_button)
        self.outer.addLayout(buttons)
        interop = QHBoxLayout()
        interop.addWidget(self.import_button)
        interop.addWidget(self.export_button)
        interop.addWidget(QLabel("Other formats: checkpoints of the original SqueezeLLM in; vLLM's packed .pt, "
                                 "a dense Hugging Face folder or GGUF out."), 1)
        self.outer.addLayout(interop)
        facts = QWidget()
        form = QFormLayout(facts)
        for key, label in FACTS:
            value = QLabel("–")
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value.setWordWrap(True)
            name = QLabel(label)
            name.setToolTip(FACT_TIPS.get(key, ""))
            value.setToolTip(FACT_TIPS.get(key, ""))
            form.addRow(name, value)
            self.facts[key] = value
        left = QWidget()
        column = QVBoxLayout(left)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(group("This model", facts))
        column.addWidget(group("Recent models", self.recent_list))
        column.addStretch(1)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(group("Quantizable matrices (the Linear layers inside the decoder blocks)",
                                 self.layers_table))
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([380, 700])
        self.outer.addWidget(splitter, 1)

    # ------------------------------------------------------------ opening

    def open_model(self, spec: str) -> bool:
        """Load ``spec`` in the background; the session changes when it is ready."""
        spec = spec.strip()
        if not spec:
            return False
        return self.runner.run(LOAD_TITLE, lambda: load_job(spec), on_result=lambda r: self._loaded(spec, r),
                               stages=LOAD_STAGES)

    def browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a model folder", storage.last_folder("model"))
        if folder:
            storage.remember_folder("model", folder)
            self.open_model(folder)

    def browse_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF file", storage.last_folder("model"),
                                              "GGUF files (*.gguf);;All files (*)")
        if path:
            storage.remember_folder("model", path)
            self.open_model(path)

    def _open_typed(self) -> None:
        self.open_model(self.spec_edit.text())

    def _loaded(self, spec: str, result: tuple) -> None:
        self.model_opened(spec, *result)

    def model_opened(self, spec: str, loaded, info: ModelInfo) -> None:
        """Make a model loaded elsewhere (e.g. by an import) the current one, as opening it here does."""
        self.session.set_model(loaded, info)
        storage.remember_model(spec)
        self.refresh_recent()
        self.model_loaded.emit()

    def refresh_recent(self) -> None:
        self.recent_list.clear()
        self.recent_list.addItems(storage.recent_models())

    # ------------------------------------------------------------ other formats

    def show_import_dialog(self) -> None:
        """Open the dialog that imports an original SqueezeLLM checkpoint (then opens the result)."""
        if self.import_dialog is None:
            self.import_dialog = ImportDialog(self.session, self.runner, self)
            self.import_dialog.imported.connect(self.model_opened)
        self.import_dialog.refresh()
        self.import_dialog.open()

    def show_export_dialog(self) -> None:
        """Open the export dialog for the known quantized folders (the current model first)."""
        if not self.session.results:
            self.runner.reporter.show_message("Nothing to export", "Open a quantized folder (or quantize a model) "
                                              "first: only quantized models are exported.")
            return
        if self.export_dialog is None:
            self.export_dialog = ExportDialog(self.session, self.runner, self)
        self.export_dialog.refresh()
        self.export_dialog.open()

    # ------------------------------------------------------------ showing

    def show_info(self, info: ModelInfo | None) -> None:
        values = dict.fromkeys(self.facts, "–")
        if info is not None:
            on_disk = f", {human_bytes(info.file_bytes)} on disk" if info.file_bytes else ""
            values.update(
                name=info.name + (" (quantized)" if info.quantized else ""), source=info.source,
                architecture=info.architecture,
                parameters=f"{human_count(info.parameters)} ({info.parameters:,})",
                blocks=f"{info.blocks} (hidden size {info.hidden_size})",
                quantizable=f"{len(info.layers)} matrices, {human_count(info.quantizable_parameters)} weights",
                stored=(f"{info.stored_dtype}: {human_bytes(info.memory_bytes)}{on_disk}" if info.stored_dtype else
                        f"quantized{on_disk}"),
                memory=(human_bytes(info.memory_bytes) if info.resident_bytes is None else
                        f"{human_bytes(info.resident_bytes)} (the weights stay on disk until a page needs them)"),
                estimate4=human_bytes(info.estimated_bytes.get(4)) if info.estimated_bytes else "already quantized",
                estimate3=human_bytes(info.estimated_bytes.get(3)) if info.estimated_bytes else "already quantized",
                plan="already quantized" if info.quantized else "")
        for key, label in self.facts.items():
            label.setText(values[key])
        self._show_plan()
        rows = info.layers if info is not None else []
        self.layers_table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = (row["name"], " × ".join(map(str, row["shape"])), f"{row['parameters']:,}", row["dtype"])
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.layers_table.setItem(r, c, item)
        self.layers_table.resizeColumnsToContents()
        self.layers_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)

    def _show_plan(self) -> None:
        """What quantizing the open original will hold at its peak (core.memory_plan), against what is free."""
        model = self.session.model
        if model is None or model.quantized:
            return
        import dataclasses

        from core.errors import UserError
        from core.memory_plan import activation_budget, available_memory, plan_for

        calibration, config = self.session.calibration, self.session.quant_config
        squeezellm = config.method == "squeezellm"
        plan = plan_for(model.lazy, calibration.samples, calibration.seqlen, fisher=squeezellm,
                        refine=squeezellm and config.refine, refine_groups=config.refine_groups,
                        embed_bits=config.embed_bits, head_bits=config.head_bits)
        free = available_memory()
        try:  # as the run does: the block inputs that do not fit in memory go to disk
            budget, too_big = activation_budget(plan, available=free), ""
        except UserError:
            budget, too_big = 0, "; more than is free: use fewer or shorter windows, or a GPU"
        plan = dataclasses.replace(plan, activations_in_ram=min(plan.activations, budget))
        on_disk = f" ({human_bytes(plan.spilled)} of block inputs on disk)" if plan.spilled else ""
        self.facts["plan"].setText(f"about {human_bytes(plan.cpu_peak)}{on_disk} with {calibration.samples} windows "
                                   f"of {calibration.seqlen} tokens, {human_bytes(free)} free now{too_big}")
        self.facts["plan"].setToolTip(FACT_TIPS["plan"] + "\n" + plan.describe())

    def update_actions(self) -> None:
        idle = not self.runner.busy
        for widget in (self.demo_button, self.open_folder_button, self.open_gguf_button, self.open_button,
                       self.recent_list, self.import_action, self.import_button):
            widget.setEnabled(idle)
        for widget in (self.export_action, self.export_button):
            widget.setEnabled(idle and bool(self.session.results))
