"""Export a quantized folder for other tools: the original's packed .pt (vLLM), a dense HF folder (with
its perplexity cost measured), or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QComboBox, QLabel, QWidget

from studio import storage
from studio.dialogs.common import JobDialog
from studio.widgets.pickers import PathPicker
from studio.dialogs.interop_jobs import (
    COST_WINDOWS,
    ExportOutcome,
    ExportRequest,
    ExportWritten,
    cost_config,
    default_export_path,
    export_job,
    export_stages,
)
from studio.format import human_bytes
from studio.session import QuantResult, Session
from studio.workers import JobRunner

EXPORT_TITLE = "Exporting"
FORMAT_LABELS = {"squeezellm-pt": "squeezellm-pt: the original's packed .pt, for vLLM ≤ 0.6",
                 "hf-dense": "hf-dense: dequantized Hugging Face folder, for any engine",
                 "gguf": "gguf: one dequantized file, for llama.cpp, Ollama, LM Studio"}
FORMAT_TIPS = {"squeezellm-pt": "Only 4-bit dense-only models: vLLM's SqueezeLLM loader has no 3-bit and no "
                                "sparse part. Stays small.",
               "hf-dense": "LUT[codes] + sparse part written as ordinary weights: full dense size.",
               "gguf": "LLaMA-family models; float16 or float32 weights: full dense size."}
DTYPE_LABELS = {"float16": "float16 (fp16)", "bfloat16": "bfloat16 (bf16)", "float32": "float32"}
GGUF_DTYPES = ("float16", "float32")
INTRO = ("Write the quantized model in a format other tools serve. Only squeezellm-pt stays small; hf-dense "
         "and gguf hold the dequantized weights at full dense size, and rounding them to 16 bits may cost a "
         "little perplexity, which this dialog measures for hf-dense.")


class ExportDialog(JobDialog):
    """Model, format, dtype and output; Export runs core's export in the worker (and, for hf-dense, a
    perplexity comparison of the export with the quantized folder)."""

    job_title = EXPORT_TITLE

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(runner, "Export a quantized model", INTRO, "Export", parent)
        # imported here, not at startup: it registers a transformers quantizer (seconds until a model is loaded)
        from core.interop.export import EXPORT_FORMATS

        self.formats = EXPORT_FORMATS
        self.session = session
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("A quantized folder made or opened in this session")
        self.format_combo = QComboBox()
        for index, fmt in enumerate(self.formats):
            self.format_combo.addItem(FORMAT_LABELS[fmt], fmt)
            self.format_combo.setItemData(index, FORMAT_TIPS[fmt], Qt.ItemDataRole.ToolTipRole)
        self.reason_label = QLabel()
        self.reason_label.setObjectName("caption")
        self.reason_label.setWordWrap(True)
        self.dtype_combo = QComboBox()
        for dtype, label in DTYPE_LABELS.items():
            self.dtype_combo.addItem(label, dtype)
        self.dtype_combo.setToolTip("Dtype of the dense tensors written (the LUTs of squeezellm-pt stay float32)")
        self.output_picker = PathPicker(storage.EXPORT_OUTPUT, "Where to write the export", "folder",
                                        default_name=lambda: self._default_output().name)
        self.measure_check = QCheckBox()
        self.measure_check.setChecked(True)
        self.overwrite_check = QCheckBox("Replace the output if it already exists")
        self._auto_output = ""
        self._written: Path | None = None
        self._request: ExportRequest | None = None
        self.form.addRow("Model", self.model_combo)
        self.form.addRow("Format", self.format_combo)
        self.form.addRow("", self.reason_label)
        self.form.addRow("Weights as", self.dtype_combo)
        self.form.addRow("Output", self.output_picker)
        self.form.addRow("", self.measure_check)
        self.form.addRow("", self.overwrite_check)
        self.model_combo.currentIndexChanged.connect(self._on_choice_changed)
        self.format_combo.currentIndexChanged.connect(self._on_choice_changed)
        self.dtype_combo.currentIndexChanged.connect(self._on_choice_changed)
        self.output_picker.changed.connect(self.update_actions)
        self.refresh()

    # ------------------------------------------------------------ choices

    def refresh(self) -> None:
        """List the known quantized folders, the current model first."""
        results = list(reversed(self.session.results))
        current = self.session.model
        if current is not None and current.quantized:
            results.sort(key=lambda r: r.loaded is not current)
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for result in results:
            self.model_combo.addItem(f"{result.name}  ({result.path})", result)
        self.model_combo.blockSignals(False)
        self._on_choice_changed()

    def selected(self) -> QuantResult | None:
        return self.model_combo.currentData()

    @property
    def fmt(self) -> str:
        return self.format_combo.currentData()

    @property
    def dtype(self) -> str:
        return self.dtype_combo.currentData()

    def _on_choice_changed(self) -> None:
        from core.interop.export import vllm_export_problem

        result = self.selected()
        problem = vllm_export_problem(result.loaded.model) if result is not None else None
        self._enable_item(self.format_combo, "squeezellm-pt", problem is None)
        self.reason_label.setText(f"squeezellm-pt is not possible for this model: {problem}." if problem else "")
        self.reason_label.setVisible(bool(problem))
        pt_index = self.format_combo.findData("squeezellm-pt")
        self.format_combo.setItemData(pt_index, f"Not possible: {problem}" if problem else
                                      FORMAT_TIPS["squeezellm-pt"], Qt.ItemDataRole.ToolTipRole)
        if problem and self.fmt == "squeezellm-pt":
            self.format_combo.setCurrentIndex(self.formats.index("hf-dense"))  # re-enters this method
            return
        for dtype in DTYPE_LABELS:
            self._enable_item(self.dtype_combo, dtype, self.fmt != "gguf" or dtype in GGUF_DTYPES)
        if self.fmt == "gguf" and self.dtype not in GGUF_DTYPES:
            self.dtype_combo.setCurrentIndex(list(DTYPE_LABELS).index("float16"))
            return
        if self.fmt == "gguf":
            self.output_picker.set_mode("save", "GGUF files (*.gguf)")
        else:
            self.output_picker.set_mode("folder")
        config = cost_config(self.session.eval_config)
        self.measure_check.setText(f"Measure the perplexity cost ({config.windows} × {config.seqlen} tokens of "
                                   f"'{Path(config.source).name or config.source}')")
        self.measure_check.setToolTip("Perplexity of the quantized folder and of the export on the same windows: "
                                      "the Evaluate page's text and window length, at most "
                                      f"{COST_WINDOWS} windows (a GUI twin of 'squeeze eval A B --compare')")
        self.measure_check.setVisible(self.fmt == "hf-dense")
        if result is not None and self.output_picker.value() in ("", self._auto_output):
            self._auto_output = str(self._default_output())
            self.output_picker.set_value(self._auto_output)
        self.update_actions()

    def _default_output(self) -> Path:
        result = self.selected()
        folder = result.path if result is not None else Path("model")
        where = Path(storage.last_folder(storage.EXPORT_OUTPUT, folder.parent))
        return default_export_path(folder, self.fmt, self.dtype, where)

    @staticmethod
    def _enable_item(combo: QComboBox, data: str, enabled: bool) -> None:
        combo.model().item(combo.findData(data)).setEnabled(enabled)

    def form_ready(self) -> bool:
        return self.selected() is not None and bool(self.output_picker.value())

    # ------------------------------------------------------------ the run

    def start(self) -> bool:
        result = self.selected()
        if result is None or not self.form_ready():
            return False
        measure = self.fmt == "hf-dense" and self.measure_check.isChecked()
        request = ExportRequest(folder=Path(result.path), fmt=self.fmt,
                                output=Path(self.output_picker.value()).expanduser(), dtype=self.dtype,
                                overwrite=self.overwrite_check.isChecked(),
                                cost=cost_config(self.session.eval_config) if measure else None)
        self._written, self._request = None, request
        return self.run_job(lambda: export_job(request), export_stages(self.fmt, measure), on_result=self._exported,
                            on_yield=self._on_yield)

    def _on_yield(self, value) -> None:
        if isinstance(value, ExportWritten):
            self._written = value.path

    def _exported(self, outcome: ExportOutcome) -> None:
        storage.remember_folder(storage.EXPORT_OUTPUT, outcome.path.parent)
        lines = [f"<b>Wrote {outcome.path}</b> ({human_bytes(outcome.size_bytes)})"]
        if outcome.cost is not None:
            cost, config = outcome.cost, outcome.cost.config
            lines.append(f"Perplexity on {config.windows} windows of {config.seqlen} tokens: quantized "
                         f"<b>{cost.quantized:.3f}</b>, exported {self._request.dtype} "
                         f"<b>{cost.exported:.3f}</b> ({cost.change_percent:+.2f}%)")
        lines += [f"<i>{warning}</i>" for warning in outcome.warnings]
        self.show_result("<br>".join(lines), outcome.path)
        self._auto_output = self.output_picker.value()  # the next export gets a fresh name
        self._on_choice_changed()

    def job_ended(self, outcome: str) -> None:
        if outcome == "cancelled" and self._written is not None:
            self.show_result(f"The export was complete and is kept at {self._written}; measuring its perplexity "
                             "was cancelled.", self._written)
            return
        super().job_ended(outcome)
