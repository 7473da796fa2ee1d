"""The studio's state: the current model, its statistics and sensitivity, the settings, the results.

Pages never talk to each other; they change the Session and listen to its signals. Everything here
is touched on the GUI thread only (workers hand their results back through signals first).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from core.config import CalibrationConfig, ChatConfig, EvalConfig, QuantConfig
from core.models import LoadedModel
from studio.model_info import ModelInfo
from studio.original import OriginalModel


@dataclass
class QuantResult:
    """A quantized model the studio knows about (made here, or opened from a folder).

    summary: the facts shown for it (bits per weight, sparse %, size, seconds per stage, settings).
    """

    name: str
    path: Path
    loaded: LoadedModel
    summary: dict = field(default_factory=dict)


class Session(QObject):
    """Holds what the pages share and says when it changes."""

    model_changed = Signal()  # a new model (or none); statistics and sensitivity were dropped
    stats_changed = Signal()  # per-matrix statistics (for previews) are ready or were recomputed
    fisher_changed = Signal()  # the sensitivity of the current model is known (or was dropped)
    quant_config_changed = Signal()
    calibration_changed = Signal()
    results_changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model: OriginalModel | LoadedModel | None = None  # an original opened lazily, or a quantized model
        self.info: ModelInfo | None = None
        self.stats: list | None = None  # list[core.preview.MatrixStats]
        self.fisher: dict | None = None  # name -> float32 [out, in]
        self.fisher_calibration: CalibrationConfig | None = None
        self.results: list[QuantResult] = []
        self.quant_config = QuantConfig()
        self.calibration = CalibrationConfig()
        self.eval_config = EvalConfig()
        self.chat_config = ChatConfig()

    # ------------------------------------------------------------ the model

    def set_model(self, loaded: OriginalModel | LoadedModel, info: ModelInfo) -> None:
        """Make ``loaded`` the current model; a quantized one is also offered as a result."""
        self.model, self.info = loaded, info
        self.stats = None
        self.fisher, self.fisher_calibration = None, None
        self.model_changed.emit()
        self.stats_changed.emit()
        self.fisher_changed.emit()
        if loaded.quantized:
            self.add_result(QuantResult(loaded.name, Path(loaded.source), loaded, {}))

    @property
    def has_dense_model(self) -> bool:
        """An original (not quantized) model is open."""
        return self.model is not None and not self.model.quantized

    def set_stats(self, stats: list) -> None:
        self.stats = stats
        self.stats_changed.emit()

    def set_fisher(self, fisher: dict, calibration: CalibrationConfig, stats: list) -> None:
        """Sensitivity of the current model, and the statistics that include its ranking."""
        self.fisher, self.fisher_calibration = fisher, calibration
        self.fisher_changed.emit()
        self.set_stats(stats)

    # ------------------------------------------------------------ settings

    def set_quant_config(self, config: QuantConfig) -> None:
        if config != self.quant_config:
            self.quant_config = config
            self.quant_config_changed.emit()

    def set_calibration(self, calibration: CalibrationConfig) -> None:
        if calibration != self.calibration:
            self.calibration = calibration
            self.calibration_changed.emit()

    def update_calibration(self, **changes) -> None:
        self.set_calibration(dataclasses.replace(self.calibration, **changes))

    # ------------------------------------------------------------ results

    def add_result(self, result: QuantResult) -> None:
        """Remember a quantized model (a result at the same path replaces the older one)."""
        self.results = [r for r in self.results if r.path != result.path] + [result]
        self.results_changed.emit()

    @property
    def latest_result(self) -> QuantResult | None:
        return self.results[-1] if self.results else None

    def result_named(self, name: str) -> QuantResult | None:
        return next((r for r in self.results if r.name == name), None)
