"""Small parts of the studio: forms from config metadata, the quantization controls, progress arithmetic,
the Pareto front, remembered models, and the entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.config import CalibrationConfig, ChatConfig, EvalConfig, OutlierConfig, QuantConfig
from core.progress import ProgressEvent
from studio import storage
from studio.plots.pareto import pareto_front
from studio.widgets.config_form import ConfigForm
from studio.widgets.progress_panel import format_seconds
from studio.widgets.quant_controls import QuantControls
from studio.workers import ProgressTracker


def test_config_form_builds_editors_from_metadata(qtbot):
    form = ConfigForm(EvalConfig(), ["windows", "seqlen", "batch_size"])
    qtbot.addWidget(form)
    windows = form.editors["windows"]
    assert (windows.minimum(), windows.maximum(), windows.value()) == (1, 100000, 40)
    assert form.labels["windows"].text() == "Windows"
    assert "non-overlapping" in windows.toolTip() and windows.toolTip() == form.labels["windows"].toolTip()
    with qtbot.waitSignal(form.changed):
        windows.setValue(7)
    assert form.value() == EvalConfig(windows=7)
    form.set_value(EvalConfig(seqlen=128))
    assert form.editors["seqlen"].value() == 128 and form.editors["windows"].value() == 40


def test_config_form_floats_and_invalid_values(qtbot):
    form = ConfigForm(ChatConfig(), ["temperature", "top_p"])
    qtbot.addWidget(form)
    top_p = form.editors["top_p"]
    assert top_p.decimals() == 2 and top_p.singleStep() == 0.01
    top_p.setValue(0.5)
    assert form.value().top_p == 0.5
    calibration = ConfigForm(CalibrationConfig(), ["source", "samples"])
    qtbot.addWidget(calibration)
    calibration.editors["source"].setText("my.txt")
    assert calibration.value().source == "my.txt"
    calibration.set_value(CalibrationConfig(samples=3))
    assert calibration.editors["samples"].value() == 3


def test_config_form_shows_the_config_s_own_refusal(qtbot):
    # both outlier settings at once are refused by OutlierConfig itself; the form says why
    form = ConfigForm(OutlierConfig(), ["range_multiplier", "percent"])
    qtbot.addWidget(form)
    assert form.editors["range_multiplier"].text() == "off"
    assert form.value() == OutlierConfig()
    form.editors["range_multiplier"].setValue(2.0)
    assert form.value() is None
    assert "not both" in form.error_label.text() and not form.error_label.isHidden()
    form.editors["percent"].setValue(form.editors["percent"].minimum())
    assert form.value() == OutlierConfig(range_multiplier=2.0, percent=None)
    assert form.error_label.isHidden()


def test_config_form_bool_fields_are_check_boxes(qtbot):
    from PySide6.QtWidgets import QCheckBox

    form = ConfigForm(QuantConfig(), ["target_bits", "refine"])
    qtbot.addWidget(form)
    box = form.editors["refine"]
    assert isinstance(box, QCheckBox) and box.isChecked() == QuantConfig().refine
    assert box.toolTip().count(". ") == 0 and "gradient" in box.toolTip()  # one sentence
    with qtbot.waitSignal(form.changed):
        box.setChecked(not QuantConfig().refine)
    assert form.value().refine is (not QuantConfig().refine)
    form.set_value(QuantConfig(refine=True))
    assert box.isChecked()


def test_quant_controls_round_trip(qtbot):
    controls = QuantControls(sliders=True)
    qtbot.addWidget(controls)
    assert controls.value() == QuantConfig()
    config = QuantConfig(bits=3, outliers=OutlierConfig(range_multiplier=2.5, percent=None), sensitivity_percent=0.2)
    controls.set_value(config)
    assert controls.value() == config
    assert controls.form.isRowVisible(controls.range_edit) and not controls.form.isRowVisible(controls.percent_edit)
    with qtbot.waitSignal(controls.changed):
        controls.mode_combo.setCurrentIndex(controls.mode_combo.findData("none"))
    assert not controls.value().outliers.enabled
    for widget in (controls.bits_combo, controls.mode_combo, controls.range_edit, controls.sensitivity_edit):
        assert widget.toolTip()


def test_quant_controls_rtn_disables_the_sparse_settings(qtbot):
    controls = QuantControls(sliders=False, show_method=True)
    qtbot.addWidget(controls)
    controls.method_combo.setCurrentIndex(controls.method_combo.findData("rtn"))
    assert controls.value().method == "rtn"
    assert not controls.sensitivity_edit.isEnabled() and not controls.mode_combo.isEnabled()


def test_progress_tracker_weights_stages_and_estimates_time():
    tracker = ProgressTracker({"fisher": 3.0, "quantize": 1.0})
    overall, eta = tracker.update(ProgressEvent("fisher", 1, 2))
    assert overall == pytest.approx(0.375)
    assert eta is not None and eta >= 0
    overall, _ = tracker.update(ProgressEvent("quantize", 2, 4))  # interleaved: each stage keeps its own share
    assert overall == pytest.approx(0.375 + 0.125)
    overall, _ = tracker.update(ProgressEvent("fisher", 2, 2))
    assert overall == pytest.approx(0.875)
    overall, _ = tracker.update(ProgressEvent("fisher", 0, 2))  # never goes backwards
    assert overall == pytest.approx(0.875)
    skipped = ProgressTracker({"load": 1.0, "fisher": 2.0, "quantize": 1.0})
    assert skipped.update(ProgressEvent("quantize", 1, 2))[0] == pytest.approx(0.875)  # load and fisher skipped
    assert ProgressTracker(None).update(ProgressEvent("any", 1, 4))[0] == pytest.approx(0.25)


def test_format_seconds():
    assert format_seconds(None) == "estimating…"
    assert format_seconds(42.4) == "42 s"
    assert format_seconds(125) == "2 min 05 s"
    assert format_seconds(3 * 3600 + 60) == "3 h 01 min"


def test_pareto_front_keeps_the_best_trade_offs():
    points = [(500.0, 20.0), (170.0, 21.5), (130.0, 24.0), (180.0, 23.0), (140.0, 25.0)]
    assert pareto_front(points) == [2, 1, 0]


def test_recent_models_are_unique_and_bounded():
    for i in range(storage.MAX_RECENT + 3):
        storage.remember_model(f"model-{i}")
    storage.remember_model("model-5")
    recent = storage.recent_models()
    assert recent[0] == "model-5" and len(recent) == storage.MAX_RECENT and len(set(recent)) == len(recent)
    storage.forget_model("model-5")
    assert "model-5" not in storage.recent_models()


def test_damaged_runs_file_gives_an_empty_table(studio_home):
    store = storage.RunsStore()
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("{not json")
    assert store.load() == []
    store.save([{"id": "x"}])
    assert store.load() == [{"id": "x"}]


def test_importing_the_studio_starts_nothing_and_help_works():
    code = ("import sys, studio.app, studio.main_window; "
            "from PySide6.QtWidgets import QApplication; assert QApplication.instance() is None; print('quiet')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "quiet", out.stderr
    helped = subprocess.run([sys.executable, "-m", "studio", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--model" in helped.stdout


def test_garbage_is_collected_on_the_gui_thread_only(qtbot):
    import gc
    import threading

    from studio.gc_guard import GuiThreadGarbageCollector

    was_enabled = gc.isenabled()
    collected_in: list[str] = []

    def note(phase, _info):
        if phase == "start":
            collected_in.append(threading.current_thread().name)

    def make_garbage():
        for _ in range(50 * gc.get_threshold()[0]):
            cycle: list = []
            cycle.append(cycle)

    guard = GuiThreadGarbageCollector(interval_ms=20)
    gc.callbacks.append(note)
    try:
        assert not gc.isenabled()
        worker = threading.Thread(target=make_garbage, name="worker")
        worker.start()
        worker.join()
        assert "worker" not in collected_in  # a busy worker never triggers a collection
        guard.thresholds = (-1, 10**9, 10**9)  # collect generation 0 at the next tick
        qtbot.waitUntil(lambda: bool(collected_in), timeout=3000)
        assert set(collected_in) == {threading.main_thread().name}
    finally:
        gc.callbacks.remove(note)
        guard.stop()
        if not was_enabled:
            gc.disable()


def test_histogram_threshold_labels_show_the_threshold(qtbot):
    """The ±T labels read the threshold, also when the lines were hidden before it was set."""
    import numpy as np

    from studio.plots.histogram import HistogramPlot

    plot = HistogramPlot("weights", "weight value")
    qtbot.addWidget(plot)
    plot.set_histogram(np.array([1, 5, 1]), np.array([-0.1, -0.03, 0.03, 0.1]))
    plot.set_thresholds(0.0574)
    assert [line.label.textItem.toPlainText() for line in plot.threshold_lines] == ["T -0.0574", "T +0.0574"]
    plot.set_thresholds(None)
    plot.set_thresholds(0.03)
    assert plot.threshold_lines[1].label.textItem.toPlainText() == "T +0.03"
