"""The Quantize page's mixed-precision target (QuantConfig.target_bits, SPEC H.9)."""

from __future__ import annotations

from tests.studio.helpers import open_model, wait_idle


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
