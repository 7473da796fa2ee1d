"""Each page through its own widgets, and what the studio remembers across restarts."""

from __future__ import annotations

import json

from PySide6.QtCore import Qt

from studio.main_window import MainWindow
from studio.storage import RunsStore
from tests.studio.helpers import open_model, run_and_wait, wait_idle


def test_model_page_remembers_recent_models(qtbot, window, tiny_model_dir):
    page = window.pages["model"]
    assert page.recent_list.count() == 0
    assert page.facts["name"].text() == "–"
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    assert [page.recent_list.item(i).text() for i in range(page.recent_list.count())] == [str(tiny_model_dir)]
    assert page.layers_table.item(0, 0).text().endswith("q_proj")
    assert page.layers_table.item(0, 1).text() == "64 × 64"
    wait_idle(qtbot, window)
    # the recent list opens a model again
    with qtbot.waitSignal(window.runner.finished, timeout=60000):
        page.recent_list.itemActivated.emit(page.recent_list.item(0))
    assert window.session.model is not None


def test_buttons_are_disabled_while_a_job_runs(qtbot, window, tiny_model_dir):
    model_page = window.pages["model"]
    with qtbot.waitSignal(window.runner.started):
        model_page.spec_edit.setText(str(tiny_model_dir))
        model_page.open_button.click()
    assert not model_page.demo_button.isEnabled() and not model_page.open_button.isEnabled()
    assert window.cancel_button.isVisible()  # the status bar offers Cancel
    assert "Loading" in window.job_label.text()
    wait_idle(qtbot, window)
    assert model_page.demo_button.isEnabled()
    assert not window.cancel_button.isVisible()


def test_inspect_page_tree_heatmap_and_controls(qtbot, window, tiny_model_dir):
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    page = window.pages["inspect"]
    assert page.matrix_tree.topLevelItemCount() == 2  # blocks
    assert page.matrix_tree.topLevelItem(0).childCount() == 7  # modules
    assert page.selected_matrix() == "model.layers.0.self_attn.q_proj"
    qtbot.waitUntil(lambda: page.weight_hist.counts.sum() == 64 * 64)  # drawn off the GUI thread
    page.heatmap.matrix_clicked.emit("model.layers.1.mlp.down_proj")  # what a click on that cell sends
    assert page.selected_matrix() == "model.layers.1.mlp.down_proj"
    qtbot.waitUntil(lambda: page.weight_hist.counts.sum() == 64 * 160)
    # readouts follow the controls (target share mode, the default)
    qtbot.waitUntil(lambda: page.readouts["bits"].text() != "–", timeout=10000)
    four_bits = page.readouts["bits"].text()
    page.controls.bits_combo.setCurrentIndex(page.controls.bits_combo.findData(3))
    assert window.session.quant_config.bits == 3
    qtbot.waitUntil(lambda: page.readouts["bits"].text() != four_bits, timeout=10000)
    assert float(page.readouts["bits"].text().split()[0]) < float(four_bits.split()[0])
    page.controls.mode_combo.setCurrentIndex(page.controls.mode_combo.findData("none"))
    qtbot.waitUntil(lambda: page.readouts["range"].text() == "no outliers", timeout=10000)
    assert not page.weight_hist.threshold_lines[0].isVisible()
    assert page.heatmap.values.shape == (2, 7)


def test_quantize_page_summary_and_settings_follow_inspect(qtbot, window, tiny_model_dir):
    page = window.pages["quantize"]
    assert not page.run_button.isEnabled()
    assert "Open an original" in page.summary_label.text()
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    assert page.run_button.isEnabled()
    assert "14 matrices" in page.summary_label.text() and "Rough time" in page.summary_label.text()
    inspect = window.pages["inspect"]
    inspect.controls.sensitivity_edit.setValue(0.5)
    assert abs(page.controls.sensitivity_edit.value() - 0.5) < 1e-9
    assert "0.5% most sensitive" in page.summary_label.text()
    page.calibration_form.editors["samples"].setValue(7)
    assert inspect.samples_spin.value() == 7 and window.session.calibration.samples == 7
    assert "7 windows" in page.summary_label.text()
    assert page.output_picker.value().endswith("-sq4")
    assert "tip: at 3 bits" not in page.summary_label.text()
    page.controls.bits_combo.setCurrentIndex(page.controls.bits_combo.findData(3))
    assert "tip: at 3 bits, refining" in page.summary_label.text()  # the measured case for refinement
    page.mixed_form.editors["refine"].setChecked(True)
    assert "tip: at 3 bits" not in page.summary_label.text() and "refine every row" in page.summary_label.text()
    for widget in (page.controls.bits_combo, page.controls.mode_combo, page.calibration_form.editors["samples"],
                   page.device_combo):
        assert widget.toolTip()


def test_quantize_refuses_an_existing_folder_with_a_message(qtbot, window, tiny_model_dir, tmp_path):
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something.txt").write_text("keep me")
    page = window.pages["quantize"]
    page.output_picker.set_value(str(taken))
    with qtbot.waitSignal(window.reporter.shown, timeout=30000) as shown:
        assert run_and_wait(qtbot, window, page.run_button.click) == "failed"
    assert "already exists" in shown.args[0]
    assert (taken / "something.txt").read_text() == "keep me"


def test_runs_table_survives_a_restart_and_points_select_rows(qtbot, studio_home):
    runs = [{"id": "a1", "label": "original", "size_bytes": 540 * 2**20, "perplexity": 20.5, "bits": None,
             "bits_per_weight": 32.0, "corpus": "builtin", "windows": 40, "seqlen": 512},
            {"id": "b2", "label": "demo-sq4", "size_bytes": 170 * 2**20, "perplexity": 21.7, "bits": 4,
             "bits_per_weight": 4.7, "corpus": "builtin", "windows": 40, "seqlen": 512}]
    RunsStore().save(runs)
    window = MainWindow()
    qtbot.addWidget(window)
    page = window.pages["evaluate"]
    assert page.runs_table.rowCount() == 2 and page.pareto.point_count == 2
    assert page.runs_table.item(1, 6).text() == "21.700"
    page.pareto.run_clicked.emit("b2")
    assert page.runs_table.currentRow() == 1 and page.pareto.selected == "b2"
    page.remove_button.click()
    assert [r["id"] for r in json.loads((studio_home / "data" / "runs.json").read_text())] == ["a1"]
    assert not page.run_button.isEnabled()  # nothing loaded: nothing to evaluate
    window.close()


def test_settings_and_page_persist_across_restarts(qtbot):
    first = MainWindow()
    qtbot.addWidget(first)
    first.pages["inspect"].controls.bits_combo.setCurrentIndex(
        first.pages["inspect"].controls.bits_combo.findData(3))
    first.pages["chat"].settings_form.editors["temperature"].setValue(0.3)
    first.show_page("evaluate")
    first.resize(760, 540)  # inside the offscreen screen (800 x 600)
    first.close()
    second = MainWindow()
    qtbot.addWidget(second)
    assert second.session.quant_config.bits == 3
    assert second.pages["quantize"].controls.bits_combo.currentData() == 3
    assert second.session.chat_config.temperature == 0.3
    assert second.current_page_name() == "evaluate"
    assert second.size().width() == 760
    second.close()


def test_chat_stop_and_clear(qtbot, window, tiny_model_dir):
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    window.show_page("chat")
    page = window.pages["chat"]
    assert page.mode_combo.currentData() == "original"
    assert not page.transcripts["right"].isVisible()
    page.settings_form.editors["max_new_tokens"].setValue(2000)
    page.input_edit.setPlainText("Tell me a long story.")
    with qtbot.waitSignal(window.runner.finished, timeout=60000) as finished:
        page.send_button.click()
        assert page.stop_button.isEnabled() and not page.send_button.isEnabled()
        qtbot.waitUntil(lambda: len(page.transcripts["left"].reply_text) > 0, timeout=30000)
        page.stop_button.click()
    assert finished.args[1] == "done"
    assert "stopped" in page.stats_labels["left"].text()
    assert len(page.chats["left"].history) == 2  # the stopped reply stays in the conversation
    page.clear_button.click()
    assert page.chats["left"].history == [] and page.transcripts["left"].toPlainText() == ""


def test_chat_without_a_model_cannot_send(window):
    page = window.pages["chat"]
    page.input_edit.setPlainText("hello")
    assert not page.send_button.isEnabled()
    assert page.send() is False
    assert "no model" in page.titles["left"].text()
    item = window.sidebar.item(4)
    assert item.text() == "Chat" and item.toolTip()
    assert Qt.ItemFlag.ItemIsEnabled & item.flags()


def test_opening_a_quantized_folder(qtbot, window, quantized_dir):
    assert open_model(qtbot, window, quantized_dir) == "done"
    wait_idle(qtbot, window)
    model_page = window.pages["model"]
    assert "(quantized)" in model_page.facts["name"].text()
    assert model_page.layers_table.rowCount() == 14
    assert model_page.layers_table.item(0, 3).text().startswith("4-bit LUT")
    assert model_page.facts["estimate4"].text() == "already quantized"
    inspect = window.pages["inspect"]
    assert window.current_page_name() == "inspect" and window.session.stats is None  # nothing to tune
    assert "already quantized" in inspect.analyse_status.text()
    qtbot.waitUntil(lambda: inspect.weight_hist.has_data)  # the effective (dequantized) weights
    qtbot.waitUntil(lambda: inspect.weight_hist.markers.xData is not None)
    assert len(inspect.weight_hist.markers.xData) == 16
    assert not inspect.compute_button.isEnabled()
    assert not window.pages["quantize"].run_button.isEnabled()
    chat = window.pages["chat"]
    assert chat.mode_combo.currentData() == "quantized" and chat.send_button.isEnabled()
    evaluate = window.pages["evaluate"]
    assert [evaluate.models_list.item(i).text() for i in range(evaluate.models_list.count())] == \
        ["Quantized: tiny-sq4"]
