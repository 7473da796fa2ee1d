"""What a setting costs for the whole model, next to the original: the Inspect page's live readouts."""

from __future__ import annotations

from PySide6.QtWidgets import QFormLayout, QLabel, QWidget

from studio.format import human_bytes

READOUTS = (("sparse", "Kept exactly"), ("bits", "Bits per weight"),
            ("file", "File size"), ("memory", "Memory"), ("range", "Outlier range"))
READOUT_TIPS = {"sparse": "Share of the quantizable weights stored exactly: outliers plus sensitive values.",
                "bits": "Every stored bit of the quantized layers (codes, lookup tables, sparse part) per weight.",
                "file": "Estimated size of the quantized folder, next to the original weight files.",
                "memory": "Estimated memory of the quantized model, next to the original loaded in its stored dtype.",
                "range": "The IQR multiplier r behind the thresholds ±T (solved when you give a target share)."}


class ReadoutsPanel(QWidget):
    """One line per readout; ``values[key]`` is the label that shows it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        form = QFormLayout(self)
        self.values: dict[str, QLabel] = {}
        for key, text in READOUTS:
            name, value = QLabel(text), QLabel("–")
            value.setObjectName("readout")
            for widget in (name, value):
                widget.setToolTip(READOUT_TIPS[key])
            form.addRow(name, value)
            self.values[key] = value

    def clear(self) -> None:
        for label in self.values.values():
            label.setText("–")

    def show_preview(self, preview, info) -> None:
        """preview: core.preview.Preview; info: the original's studio.model_info.ModelInfo."""
        file_original = info.file_bytes or info.memory_bytes
        original_bits = 8 * info.quantizable_bytes / max(1, preview.n_weights)
        self.values["sparse"].setText(f"{preview.sparse_percent:.2f} % ({preview.outlier_percent:.2f} % outliers)")
        self.values["bits"].setText(f"{preview.bits_per_weight:.2f} bits (original {original_bits:.0f})")
        self.values["file"].setText(f"{human_bytes(preview.total_bytes)}  (original {human_bytes(file_original)})")
        self.values["memory"].setText(f"{human_bytes(preview.total_bytes)}  "
                                      f"(original {human_bytes(info.memory_bytes)})")
        self.values["range"].setText("no outliers" if preview.range_multiplier is None else
                                     f"r = {preview.range_multiplier:.2f} × IQR")
