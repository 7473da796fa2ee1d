"""The Quantize page's channel groups of refinement (QuantConfig.refine_groups): a spin box under the refine
check box, enabled only with refinement, counted in the summary and the memory line, remembered."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QSpinBox

from studio.main_window import MainWindow
from tests.studio.helpers import open_model, wait_idle


def test_groups_spin_box_follows_the_refine_check_box(qtbot, window, tiny_model_dir):
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    box, spin = page.mixed_form.editors["refine"], page.mixed_form.editors["refine_groups"]
    assert isinstance(spin, QSpinBox) and spin.toolTip() and page.mixed_form.labels["refine_groups"].text()
    box.setChecked(False)
    assert not spin.isEnabled() and not page.mixed_form.labels["refine_groups"].isEnabled()
    box.setChecked(True)
    assert spin.isEnabled() and "refinement's H" in page.summary_label.text()
    one_group = page.summary_label.text()
    spin.setValue(4)
    config = window.session.quant_config
    assert config.refine is True and config.refine_groups == 4
    text = page.summary_label.text()
    assert "(4 channel groups)" in text and text != one_group  # four H per matrix: the memory line grew
    box.setChecked(False)
    assert not spin.isEnabled() and spin.value() == 4 and window.session.quant_config.refine_groups == 4
    assert "channel groups" not in page.summary_label.text() and "refinement's H" not in page.summary_label.text()


def test_groups_are_remembered_across_restarts(qtbot):
    first = MainWindow()
    qtbot.addWidget(first)
    form = first.pages["quantize"].mixed_form
    form.editors["refine"].setChecked(True)
    form.editors["refine_groups"].setValue(2)
    first.close()
    second = MainWindow()
    qtbot.addWidget(second)
    assert second.session.quant_config.refine is True and second.session.quant_config.refine_groups == 2
    spin = second.pages["quantize"].mixed_form.editors["refine_groups"]
    assert spin.value() == 2 and spin.isEnabled()
    second.close()


def test_each_group_adds_its_hessians_to_the_estimated_calibration_pass():
    from core.config import CalibrationConfig, QuantConfig
    from studio.estimates import HESSIAN_PASS_EXTRA, estimate_seconds

    args = (135_000_000, 106_000_000)
    plain = estimate_seconds(*args, QuantConfig(bits=3), CalibrationConfig(), False, False)
    one, four = (estimate_seconds(*args, QuantConfig(bits=3, refine=True, refine_groups=g), CalibrationConfig(),
                                  False, False) for g in (1, 4))
    assert one["sensitivity"] == pytest.approx(plain["sensitivity"] * (1 + HESSIAN_PASS_EXTRA))
    assert four["sensitivity"] == pytest.approx(plain["sensitivity"] * (1 + 4 * HESSIAN_PASS_EXTRA))
