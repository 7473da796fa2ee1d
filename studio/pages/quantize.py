"""Quantize page: the settings as a form, what will happen, then a run with progress, log and cancel."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from core.config import CalibrationConfig, QuantConfig
from core.embed_head import stored_bits
from core.models import block_index
from core.pipeline import QuantizeJob
from studio.estimates import estimate_seconds
from studio.format import human_bytes
from studio.jobs import QUANTIZE_STAGES, QuantizeOutcome, default_output, quantize_job
from studio.model_info import describe, estimated_folder_bytes
from studio.pages.base import Page, align_form_labels, group
from studio.session import QuantResult
from studio.widgets.config_form import ConfigForm
from studio.widgets.pickers import CorpusPicker, PathPicker
from studio.widgets.progress_panel import JobProgressPanel, format_seconds
from studio.widgets.quant_controls import QuantControls

QUANTIZE_TITLE = "Quantizing"
STAGE_LABELS = {"load": "Load", "forward": "Forward (outliers)", "backward": "Sensitivity",
                "quantize": "k-means + pack", "allocate": "Mixed bits", "save": "Save", "reload": "Open result"}
DEFAULT_OUTPUT_BASE = Path.home() / "squeeze-models"


def average_bits(config: QuantConfig) -> float:
    """The bits a result is named after: the width, or the mixed-precision target."""
    return config.target_bits if config.target_bits is not None else config.bits


class QuantizePage(Page):
    title = "Quantize"
    description = ("Make the compressed model. The app measures sensitivity on the calibration text (cached), "
                   "keeps outliers and sensitive weights exactly, clusters every row of every matrix into "
                   "2^bits values weighted by sensitivity, and saves a folder you can evaluate, chat with, or "
                   "load with 'squeeze'. Your original model is not changed.")

    open_page = Signal(str)  # "evaluate" or "chat", asked by the buttons under a finished run

    def __init__(self, session, runner, parent: QWidget | None = None) -> None:
        super().__init__(session, runner, parent)
        self.controls = QuantControls(sliders=False, show_method=True)
        self.mixed_form = ConfigForm(session.quant_config, ["target_bits", "refine", "refine_groups"])
        self.embed_form = ConfigForm(session.quant_config, ["embed_bits", "head_bits"])  # core.embed_head
        self.calibration_form = ConfigForm(
            session.calibration, ["source", "samples", "seqlen"],
            custom={"source": lambda meta: CorpusPicker(meta.get("tooltip", ""))})
        self._suggested_output = ""  # the folder last proposed (see _suggest_output)
        self.output_picker = PathPicker("output", "Where to save the quantized model", "folder",
                                        default_name=self._default_name)
        self.output_picker.setToolTip("A new or empty folder; it appears only when the run has finished")
        self.device_combo = QComboBox()
        for device in ("auto", "cpu", "cuda"):
            self.device_combo.addItem(device, device)
        self.device_combo.setToolTip("Where the work runs: auto uses the GPU when torch sees one")
        if not torch.cuda.is_available():
            self.device_combo.model().item(2).setEnabled(False)
        self.workers_spin = QSpinBox()
        self.workers_spin.setRange(1, max(2, os.cpu_count() or 1, torch.cuda.device_count()))
        self.workers_spin.setToolTip("Processes sharing the calibration windows (torch.distributed: gloo on CPUs, one "
                                     "GPU each with GPUs). Each holds a block of its own, so memory grows with them; "
                                     "1 runs here, in the studio's process.")
        self.overwrite_check = QCheckBox("Replace the folder if it already holds files")
        self.summary_label = QLabel()
        self.summary_label.setObjectName("summary")
        self.summary_label.setWordWrap(True)
        self.run_button = QPushButton("Quantize")
        self.run_button.setObjectName("primary")
        self.run_button.setToolTip("Start the run (Ctrl+R); you can cancel at any time")
        self.panel = JobProgressPanel(runner, STAGE_LABELS)
        self.panel.show_stage("allocate", False)  # shown for mixed-precision runs only
        self.layers_table = QTableWidget(0, 4)
        self.layers_table.setHorizontalHeaderLabels(["Matrix", "Status", "Kept exactly", "Relative error"])
        self.layers_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.layers_table.verticalHeader().hide()
        header = self.layers_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.result_label = QLabel("No result yet.")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.evaluate_button = QPushButton("Evaluate it")
        self.chat_button = QPushButton("Chat with it")
        self._layout()
        self._connect()
        self._on_model_changed()

    def _layout(self) -> None:
        form_widget = QWidget()
        form = QFormLayout(form_widget)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow(self.controls)
        form.addRow(self.mixed_form)
        form.addRow(self.embed_form)
        form.addRow(self.calibration_form)
        form.addRow("Output folder", self.output_picker)
        where = QHBoxLayout()
        where.addWidget(self.device_combo, 1)
        where.addWidget(QLabel("Workers"))
        where.addWidget(self.workers_spin)
        form.addRow("Device", where)
        form.addRow("", self.overwrite_check)
        align_form_labels(form_widget)
        left = QWidget()
        column = QVBoxLayout(left)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(group("Settings", form_widget))
        column.addWidget(group("What will happen", self.summary_label))
        column.addWidget(self.run_button)
        column.addStretch(1)
        result_buttons = QHBoxLayout()
        result_buttons.addWidget(self.evaluate_button)
        result_buttons.addWidget(self.chat_button)
        result_buttons.addStretch(1)
        result = QWidget()
        result_layout = QVBoxLayout(result)
        result_layout.setContentsMargins(0, 0, 0, 0)
        result_layout.addWidget(self.result_label)
        result_layout.addLayout(result_buttons)
        right = QWidget()
        right_column = QVBoxLayout(right)
        right_column.setContentsMargins(0, 0, 0, 0)
        progress = QSplitter(Qt.Orientation.Vertical)
        progress.addWidget(group("Progress", self.panel))
        progress.addWidget(group("Per matrix", self.layers_table))
        progress.setSizes([340, 300])
        right_column.addWidget(progress, 1)
        right_column.addWidget(group("Result", result))
        # the settings keep their rows' heights and scroll in a short window (they were squeezed into
        # each other at 900 px once the embedding/head and workers rows came)
        settings = QScrollArea()
        settings.setWidget(left)
        settings.setWidgetResizable(True)
        settings.setFrameShape(QFrame.Shape.NoFrame)
        settings.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        settings.setMinimumWidth(left.minimumSizeHint().width() + settings.verticalScrollBar().sizeHint().width())
        splitter = QSplitter()
        splitter.addWidget(settings)
        splitter.addWidget(right)
        splitter.setSizes([430, 800])
        self.outer.addWidget(splitter, 1)

    def _connect(self) -> None:
        session = self.session
        self.controls.changed.connect(self._on_controls_edited)
        self.mixed_form.changed.connect(self._on_mixed_edited)
        self.embed_form.changed.connect(self._on_embed_edited)
        self.calibration_form.changed.connect(self._on_calibration_edited)
        session.quant_config_changed.connect(self._show_settings)
        session.calibration_changed.connect(self._show_settings)
        session.model_changed.connect(self._on_model_changed)
        session.fisher_changed.connect(self._show_summary)
        self.output_picker.changed.connect(self._show_summary)
        self.device_combo.currentIndexChanged.connect(self._show_summary)
        self.workers_spin.valueChanged.connect(self._show_summary)
        self.run_button.clicked.connect(self.start)
        self.evaluate_button.clicked.connect(lambda: self.open_page.emit("evaluate"))
        self.chat_button.clicked.connect(lambda: self.open_page.emit("chat"))
        self.runner.progress.connect(self._on_progress)
        self._show_settings()

    # ------------------------------------------------------------ settings and summary

    def _default_name(self) -> str:
        name = self.session.model.name if self.session.model is not None else "model"
        return default_output(name, average_bits(self.session.quant_config), Path("/nonexistent")).name

    def _on_controls_edited(self) -> None:
        if self.controls.method_combo.currentData() != "squeezellm" and self.session.quant_config.target_bits:
            # a baseline has one width for every matrix: the mixed-precision target goes
            self.controls.set_value(dataclasses.replace(self.session.quant_config, target_bits=None,
                                                        method=self.controls.method_combo.currentData()))
        self.session.set_quant_config(self.controls.value())

    def _on_mixed_edited(self) -> None:
        config = self.mixed_form.value()
        if config is not None:
            self.session.set_quant_config(config)

    def _on_embed_edited(self) -> None:
        config = self.embed_form.value()
        if config is not None:
            self.session.set_quant_config(config)

    def _on_calibration_edited(self) -> None:
        calibration = self.calibration_form.value()
        if calibration is not None:
            self.session.set_calibration(calibration)

    def _show_settings(self) -> None:
        config = self.session.quant_config
        if self.controls.value() != config:
            self.controls.set_value(config)
        if self.mixed_form.value() != config:
            self.mixed_form.set_value(config)
        if self.embed_form.value() != config:
            self.embed_form.set_value(config)
        self.controls.bits_combo.setEnabled(config.target_bits is None)
        self.mixed_form.setEnabled(not self.runner.busy and config.method == "squeezellm")
        for widget in (self.mixed_form.editors["refine_groups"], self.mixed_form.labels["refine_groups"]):
            widget.setEnabled(config.refine)  # channel groups mean nothing without refinement
        if self.calibration_form.value() != self.session.calibration:
            self.calibration_form.set_value(self.session.calibration)
        self._follow_bits_in_output()
        self._show_summary()

    def _suggest_output(self, base: Path) -> None:
        """A fresh folder under ``base`` named after the model and the bits; remembered, so that a change of
        bits renames it while the user has not chosen a folder of their own."""
        self._suggested_output = str(default_output(self.session.model.name, average_bits(self.session.quant_config),
                                                    base))
        self.output_picker.set_value(self._suggested_output)

    def _follow_bits_in_output(self) -> None:
        model = self.session.model
        output = self.output_picker.value()
        if model is not None and not model.quantized and output and output == self._suggested_output:
            self._suggest_output(Path(output).parent)

    def _on_model_changed(self) -> None:
        model = self.session.model
        if model is not None and not model.quantized:
            self._suggest_output(DEFAULT_OUTPUT_BASE)
        rows = self.session.info.layers if self.session.info is not None else []
        self.layers_table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate((row["name"], "waiting", "", "")):
                self.layers_table.setItem(r, c, QTableWidgetItem(text))
        self._show_summary()
        self.update_actions()

    def _fisher_cached(self, calibration: CalibrationConfig) -> bool:
        return self.session.fisher is not None and self.session.fisher_calibration == calibration

    def _show_summary(self) -> None:
        info, config, calibration = self.session.info, self.session.quant_config, self.session.calibration
        if info is None or info.quantized:
            self.summary_label.setText("Open an original (not yet quantized) model on the Model page first.")
            return
        cached = self._fisher_cached(calibration)
        gpu = self.device_combo.currentData() != "cpu" and torch.cuda.is_available()
        seconds = estimate_seconds(info.parameters, info.quantizable_parameters, config, calibration, cached, gpu)
        outliers = config.outliers
        keep = ("no outliers" if not outliers.enabled else
                f"{outliers.percent}% of weights as outliers" if outliers.percent is not None else
                f"outliers beyond {outliers.range_multiplier} × IQR")
        sensitivity = ("sensitivity already computed (cached)" if cached else
                       f"measure sensitivity on {calibration.samples} windows of {calibration.seqlen} tokens "
                       f"of '{Path(calibration.source).name or calibration.source}'")
        width = (f"{config.bits} bits" if config.target_bits is None else
                 f"{config.widths[0]} or {config.widths[1]} bits each ({config.target_bits} on average; "
                 "k-means at both widths)")
        steps = [f"{len(info.layers)} matrices of {info.name} to {width} ({config.method})"]
        if config.method == "squeezellm":
            steps += [sensitivity, f"keep {keep} and the {config.sensitivity_percent}% most sensitive exactly"]
            if config.refine:
                groups = f" ({config.refine_groups} channel groups)" if config.refine_groups > 1 else ""
                steps.append(f"refine every row's table and codes against the gradient-weighted layer error{groups}")
            elif config.bits == 3 and config.target_bits is None:
                steps.append("<i>tip: at 3 bits, refining codes and tables lowered the demo model's perplexity by "
                             "13-18% (README, Refinement)</i>")
        steps.append(self._embed_head_line(config, info))
        steps.append(self._memory_line(config, calibration))
        size = f"about {human_bytes(estimated_folder_bytes(info, config))}"
        if info.file_bytes:
            size += f" (the file you started from: {human_bytes(info.file_bytes)})"
        steps.append(f"save {size} to {self.output_picker.value() or '(choose a folder)'}")
        total = sum(seconds.values())
        detail = ", ".join(f"{k} {format_seconds(v)}" for k, v in seconds.items() if v >= 1)
        rough = "under a minute" if total < 60 else format_seconds(total)
        self.summary_label.setText("<br>".join(f"• {s}" for s in steps) +
                                   f"<br><b>Rough time: {rough}</b>{f' ({detail})' if detail and total >= 60 else ''}")

    @staticmethod
    def _embed_head_line(config: QuantConfig, info) -> str:
        """How the token embedding and output head will be stored (core.embed_head)."""
        pair = info.embed_head
        if pair is None:
            return "token embedding and head kept as they are"

        embed_bits, head_bits = stored_bits(config.embed_bits, config.head_bits, pair.tied, pair.cols)

        def width(bits: int, asked: int) -> str:
            if bits < 16:
                return f"{bits}-bit lookup-table codes"
            return "float16" if asked >= 16 else f"float16 ({asked}-bit codes would not be smaller on rows this narrow)"

        if pair.tied:
            return (f"token embedding and head (tied: stored once) as "
                    f"{width(embed_bits, max(config.embed_bits, config.head_bits))}")
        head = f", head as {width(head_bits, config.head_bits)}" if pair.has_head else ""
        return f"token embedding as {width(embed_bits, config.embed_bits)}{head}"

    def _memory_line(self, config: QuantConfig, calibration: CalibrationConfig) -> str:
        """What the streaming run will hold at its peak, against what is free now."""
        from core.memory_plan import available_memory, plan_for

        model, workers = self.session.model, self.workers_spin.value()
        windows = math.ceil(calibration.samples / workers)  # each worker keeps the block inputs of its share
        squeezellm = config.method == "squeezellm"
        plan = plan_for(model.lazy, windows, calibration.seqlen, fisher=squeezellm, refine=squeezellm and config.refine,
                        refine_groups=config.refine_groups, embed_bits=config.embed_bits,
                        head_bits=config.head_bits)
        free = available_memory()
        spill = "" if workers * plan.cpu_peak <= 0.85 * free else " (block inputs that do not fit go to disk)"
        who = "one block at a time" if workers == 1 else \
            f"{workers} worker processes ({human_bytes(workers * plan.cpu_peak)} in all), each one block at a time"
        return f"{who}: {plan.describe().replace('needs about', 'about', 1)}; {human_bytes(free)} free now{spill}"

    # ------------------------------------------------------------ the run

    def start(self) -> bool:
        """Start quantizing the session's model with the form's settings."""
        model = self.session.model
        calibration = self.calibration_form.value()
        output = self.output_picker.value()
        if model is None or model.quantized or calibration is None:
            return False
        if not output:
            self.runner.reporter.show_message("No output folder", "Choose where to save the quantized model.")
            return False
        job = QuantizeJob(model=model.source, output=Path(output).expanduser(), config=self.session.quant_config,
                          calibration=calibration, device=self.device_combo.currentData(),
                          overwrite=self.overwrite_check.isChecked(), workers=self.workers_spin.value())
        for r in range(self.layers_table.rowCount()):
            for c, text in ((1, "waiting"), (2, ""), (3, "")):
                self.layers_table.setItem(r, c, QTableWidgetItem(text))
        self.panel.show_stage("allocate", job.config.target_bits is not None)
        self.panel.watch(QUANTIZE_TITLE)
        self.result_label.setText("Running…")
        return self.runner.run(QUANTIZE_TITLE, lambda: quantize_job(job), stages=QUANTIZE_STAGES,
                               on_result=lambda outcome: self._finished(job, outcome), on_end=self._ended)

    def _on_progress(self, progress) -> None:
        """Rows follow the engine's named events: a block's sensitivity (its rows start working), each
        matrix quantized (its row is done), a block written (all its rows done)."""
        event = progress.event
        if progress.title != QUANTIZE_TITLE or not event.item or event.stage not in ("backward", "quantize"):
            return
        block = block_index(event.item)
        whole_block = event.item.rsplit(".", 1)[-1].isdigit()
        first = None
        for r in range(self.layers_table.rowCount()):
            name, status = self.layers_table.item(r, 0), self.layers_table.item(r, 1)
            if name is None or status is None or block_index(name.text()) != block:
                continue
            if event.stage == "quantize" and (whole_block or name.text() == event.item):
                status.setText("done")
            elif status.text() != "done":
                status.setText("working…")
                first = first if first is not None else name
        if first is not None:
            self.layers_table.scrollToItem(first)

    def _finished(self, job: QuantizeJob, outcome: QuantizeOutcome) -> None:
        report = outcome.report
        path = Path(job.output).expanduser().resolve()
        info = describe(outcome.loaded)
        size = info.file_bytes or info.memory_bytes
        original = self.session.info.file_bytes or self.session.info.memory_bytes
        summary = {"bits_per_weight": report.bits_per_weight, "sparse_percent": report.sparse_percent,
                   "bytes": size, "seconds": dict(report.seconds), "range_multiplier": report.range_multiplier}
        self.session.add_result(QuantResult(path.name, path, outcome.loaded, summary))
        if self.session.model is not None:  # the next run gets a fresh folder name
            self._suggest_output(path.parent)
        by_name = {layer.name: layer for layer in report.layers}
        for r in range(self.layers_table.rowCount()):
            layer = by_name.get(self.layers_table.item(r, 0).text())
            if layer is not None:
                self.layers_table.item(r, 1).setText("done")
                self.layers_table.setItem(r, 2, QTableWidgetItem(f"{layer.sparse:,}"))
                self.layers_table.setItem(r, 3, QTableWidgetItem(f"{layer.relative_error:.4f}"))
        # k-means seconds are summed over the worker threads, so they can exceed the wall-clock total
        stages = ", ".join(f"{k} {v:.0f} {'CPU-s' if k == 'kmeans' else 's'}" for k, v in report.seconds.items()
                           if v >= 0.5)
        split = report.matrices_per_bits
        mixed = (" (" + ", ".join(f"{n} matrices at {bits} bits" for bits, n in split.items()) + ")"
                 if len(split) > 1 else "")
        self.result_label.setText(
            f"<b>Saved {path}</b><br>Size {human_bytes(size)} (original {human_bytes(original)}), "
            f"{report.bits_per_weight:.2f} bits per weight{mixed}, {report.sparse_percent:.2f}% kept exactly; "
            f"took {format_seconds(outcome.seconds)}{f' ({stages})' if stages else ''}.")

    def _ended(self, outcome: str) -> None:
        if outcome == "cancelled":
            self.result_label.setText("Cancelled: no folder was written.")
        elif outcome == "failed":
            self.result_label.setText("The run failed (see the message); no folder was written.")
        self.update_actions()

    def update_actions(self) -> None:
        idle = not self.runner.busy
        dense = self.session.has_dense_model
        self.run_button.setEnabled(idle and dense)
        for widget in (self.controls, self.embed_form, self.calibration_form, self.output_picker, self.device_combo,
                       self.workers_spin, self.overwrite_check):
            widget.setEnabled(idle)
        self.mixed_form.setEnabled(idle and self.session.quant_config.method == "squeezellm")
        has_result = self.session.latest_result is not None
        self.evaluate_button.setEnabled(idle and has_result)
        self.chat_button.setEnabled(idle and has_result)
