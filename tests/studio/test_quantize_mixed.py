"""The Quantize page's mixed-precision target (QuantConfig.target_bits, SPEC H.9)."""

from __future__ import annotations

import pytest

from tests.studio.helpers import open_model, run_and_wait, small_calibration, wait_idle


def test_target_bits_field_sets_the_budget_and_follows_the_method(qtbot, window, tiny_model_dir):
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    editor = page.mixed_form.editors["target_bits"]
    assert editor.text() == "off" and editor.toolTip() and page.controls.bits_combo.isEnabled()
    editor.setValue(3.5)
    assert window.session.quant_config.target_bits == 3.5
    assert not page.controls.bits_combo.isEnabled()
    assert "3.5 on average" in page.summary_label.text()
    page.controls.sensitivity_edit.setValue(0.3)  # other settings keep the target
    assert window.session.quant_config.target_bits == 3.5
    assert window.pages["inspect"].controls.value().target_bits == 3.5
    method = page.controls.method_combo
    method.setCurrentIndex(method.findData("rtn"))  # a baseline has one width: the target goes
    config = window.session.quant_config
    assert config.method == "rtn" and config.target_bits is None
    assert not page.mixed_form.isEnabled() and editor.text() == "off"
    method.setCurrentIndex(method.findData("squeezellm"))
    assert page.mixed_form.isEnabled() and page.controls.bits_combo.isEnabled()


def test_the_proposed_folder_follows_the_bits_until_the_user_picks_one(qtbot, window, tiny_model_dir, tmp_path):
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    picker, combo = page.output_picker, page.controls.bits_combo
    assert picker.value().endswith("-sq4")
    combo.setCurrentIndex(combo.findData(5))
    assert picker.value().endswith("-sq5")
    page.mixed_form.editors["target_bits"].setValue(4.8)
    assert picker.value().endswith("-sq4.8")
    chosen = str(tmp_path / "mine")
    picker.set_value(chosen)  # the user's own folder is never renamed
    page.mixed_form.editors["target_bits"].setValue(3.5)
    assert picker.value() == chosen


def test_mixed_runs_are_named_after_the_target_and_estimated_at_both_widths(tmp_path):
    from core.config import CalibrationConfig, QuantConfig
    from studio.estimates import estimate_seconds
    from studio.jobs import default_output

    assert default_output("demo", 3.5, tmp_path).name == "demo-sq3.5"
    assert default_output("demo", 4, tmp_path).name == "demo-sq4"
    args = (135_000_000, 106_000_000)
    single = estimate_seconds(*args, QuantConfig(bits=4), CalibrationConfig(), True, False)["quantize"]
    mixed = estimate_seconds(*args, QuantConfig(target_bits=3.5), CalibrationConfig(), True, False)["quantize"]
    assert mixed == pytest.approx(single * 7 / 4)


def test_a_mixed_run_shows_its_allocation_stage(qtbot, window, tiny_model_dir, corpus_file, tmp_path):
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    assert not page.panel.stage_bars["allocate"].isVisibleTo(page)
    page.mixed_form.editors["target_bits"].setValue(3.5)
    small_calibration(window, corpus_file)
    page.output_picker.set_value(str(tmp_path / "mixed"))
    assert run_and_wait(qtbot, window, page.run_button.click) == "done"
    assert page.panel.stage_bars["allocate"].isVisibleTo(page)
    assert page.panel.stage_bars["allocate"].value() == 1000
    assert "matrices at 4 bits" in page.result_label.text()


def test_refine_check_box_sets_the_config_and_the_summary(qtbot, window, tiny_model_dir):
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    box = page.mixed_form.editors["refine"]
    assert box.toolTip() and page.mixed_form.labels["refine"].text() == "Refine codes and tables"
    box.setChecked(True)
    assert window.session.quant_config.refine is True
    assert "refine every row" in page.summary_label.text()
    box.setChecked(False)
    assert window.session.quant_config.refine is False and "refine every row" not in page.summary_label.text()


def test_refinement_is_estimated_as_its_own_stage():
    from core.config import CalibrationConfig, QuantConfig
    from studio.estimates import estimate_seconds

    args = (135_000_000, 106_000_000)
    plain = estimate_seconds(*args, QuantConfig(bits=3), CalibrationConfig(), False, False)
    refined = estimate_seconds(*args, QuantConfig(bits=3, refine=True), CalibrationConfig(), False, False)
    assert "refine" not in plain and refined["refine"] > 0
    assert refined["sensitivity"] > plain["sensitivity"] and refined["quantize"] == plain["quantize"]
