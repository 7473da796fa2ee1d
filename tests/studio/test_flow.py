"""The whole studio on a tiny model, as a person uses it: load, compute sensitivity, move the range and
watch the readouts, quantize, evaluate, chat side by side."""

from __future__ import annotations

import math
import re

from tests.studio.helpers import open_model, run_and_wait, small_calibration, wait_idle


def _number(text: str) -> float:
    return float(re.search(r"[-+]?\d+(?:\.\d+)?", text).group())


def test_load_sensitivity_readouts_quantize_evaluate_chat(qtbot, window, tiny_model_dir, corpus_file, tmp_path):
    # load: the Model page describes it, the status bar names it, the Inspect page opens and analyses it
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    model_page = window.pages["model"]
    assert model_page.facts["architecture"].text() == "LlamaForCausalLM"
    assert model_page.layers_table.rowCount() == 14  # 2 blocks x 7 projections
    assert "MB" in model_page.facts["estimate3"].text()
    assert tiny_model_dir.name in window.model_label.text()
    assert window.current_page_name() == "inspect"
    wait_idle(qtbot, window)
    inspect = window.pages["inspect"]
    assert window.session.stats is not None and len(window.session.stats) == 14
    qtbot.waitUntil(lambda: inspect.weight_hist.has_data)
    assert not inspect.fisher_hist.has_data

    # sensitivity: computed in the background, then drawn for the selected matrix
    small_calibration(window, corpus_file)
    assert inspect.samples_spin.value() == 2  # the Inspect page shares the calibration setting
    assert run_and_wait(qtbot, window, inspect.compute_button.click) == "done"
    assert window.session.fisher is not None
    qtbot.waitUntil(lambda: inspect.fisher_hist.has_data)
    assert inspect.sensitivity_panel.stage_bars["fisher"].value() == 1000

    # the range control moves the readouts and the threshold lines
    controls = inspect.controls
    controls.mode_combo.setCurrentIndex(controls.mode_combo.findData("range"))
    controls.range_edit.setValue(4.0)
    qtbot.waitUntil(lambda: window.session.quant_config.outliers.range_multiplier == 4.0)
    qtbot.waitUntil(lambda: "4.00" in inspect.readouts["range"].text(), timeout=5000)
    wide = _number(inspect.readouts["sparse"].text())
    threshold_wide = inspect.weight_hist.threshold_lines[1].value()
    controls.range_edit.setValue(1.0)
    qtbot.waitUntil(lambda: "1.00" in inspect.readouts["range"].text(), timeout=5000)
    narrow = _number(inspect.readouts["sparse"].text())
    assert narrow > wide  # a tighter range keeps more outliers
    assert inspect.weight_hist.threshold_lines[1].isVisible()
    assert inspect.weight_hist.threshold_lines[1].value() < threshold_wide
    assert inspect.layer_bars.bar_count == 14
    assert "MB" in inspect.readouts["file"].text()

    # quantize: the form follows the Inspect setting; the result is saved, summarised and offered
    window.show_page("quantize")
    quantize = window.pages["quantize"]
    assert quantize.controls.range_edit.value() == 1.0
    output = tmp_path / "tiny-sq4"
    quantize.output_picker.set_value(str(output))
    assert run_and_wait(qtbot, window, quantize.run_button.click) == "done"
    assert (output / "config.json").is_file()
    assert "bits per weight" in quantize.result_label.text()
    assert quantize.panel.overall_bar.value() == 1000
    assert not quantize.panel.stage_bars["allocate"].isVisibleTo(quantize)  # no mixed-bits row in a 4-bit run
    assert all(quantize.layers_table.item(r, 1).text() == "done" for r in range(14))
    assert quantize.evaluate_button.isEnabled()
    # the Inspect page now shows the lookup-table values of the selected matrix
    qtbot.waitUntil(lambda: inspect.weight_hist.markers.xData is not None
                    and len(inspect.weight_hist.markers.xData) == 16)

    # evaluate the original and the result on the same windows; the runs table and plot fill in
    quantize.evaluate_button.click()
    assert window.current_page_name() == "evaluate"
    evaluate = window.pages["evaluate"]
    evaluate.eval_form.editors["source"].set_value(str(corpus_file))
    evaluate.eval_form.editors["windows"].setValue(2)
    evaluate.eval_form.editors["seqlen"].setValue(64)
    assert evaluate.models_list.count() == 2
    assert run_and_wait(qtbot, window, evaluate.run_button.click) == "done"
    assert evaluate.runs_table.rowCount() == 2
    assert evaluate.pareto.point_count == 2
    perplexities = [_number(evaluate.runs_table.item(r, 6).text()) for r in range(2)]
    assert all(math.isfinite(p) and p > 1 for p in perplexities)
    first_run = evaluate.runs[0]["id"]
    evaluate.pareto.run_clicked.emit(first_run)  # what a click on the point sends
    assert evaluate.runs_table.currentRow() == 0

    # chat side by side: the same message to both, tokens per second under each
    quantize_chat = quantize.chat_button
    window.show_page("quantize")
    quantize_chat.click()
    assert window.current_page_name() == "chat"
    chat = window.pages["chat"]
    assert chat.mode_combo.currentData() == "side"
    chat.settings_form.editors["max_new_tokens"].setValue(6)
    chat.settings_form.editors["temperature"].setValue(0.0)
    chat.input_edit.setPlainText("Hello, who are you?")
    assert run_and_wait(qtbot, window, chat.send_button.click) == "done"
    for side in ("left", "right"):
        assert "Hello, who are you?" in chat.transcripts[side].toPlainText()
        assert "tokens/s" in chat.stats_labels[side].text()
        assert len(chat.chats[side].history) == 2
