"""The Quantize page's embedding / head widths (core.embed_head) and the whole-file size beside the original's."""

from __future__ import annotations

import re

from core.config import QuantConfig
from studio.model_info import estimated_folder_bytes
from tests.studio.helpers import open_model, run_and_wait, small_calibration, wait_idle


def _megabytes(text: str, label: str) -> float:
    value, unit = re.search(label + r" ([\d.]+) (MB|GB|KB)", text).groups()
    return float(value) * {"KB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


def test_embedding_and_head_widths_change_the_estimated_folder(qtbot, window, tiny_model_dir):
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    embed, head = page.embed_form.editors["embed_bits"], page.embed_form.editors["head_bits"]
    assert embed.toolTip() and [embed.itemData(i) for i in range(embed.count())] == [4, 5, 6, 8, 16]
    embed.setCurrentIndex(embed.findData(16))
    head.setCurrentIndex(head.findData(16))
    config = window.session.quant_config
    assert (config.embed_bits, config.head_bits) == (16, 16)
    text = page.summary_label.text()
    assert "token embedding and head (tied: stored once) as float16" in text
    assert "the file you started from:" in text
    wide = _megabytes(text, "save about")
    embed.setCurrentIndex(embed.findData(4))
    head.setCurrentIndex(head.findData(4))
    assert (window.session.quant_config.embed_bits, window.session.quant_config.head_bits) == (4, 4)
    text = page.summary_label.text()
    assert "as 4-bit lookup-table codes" in text
    assert _megabytes(text, "save about") < wide  # the 49152-token embedding is most of the tiny model
    method = page.controls.method_combo
    method.setCurrentIndex(method.findData("rtn"))  # the widths apply to every method
    assert page.embed_form.isEnabled() and window.session.quant_config.embed_bits == 4


def test_the_estimated_folder_matches_the_folder_written_with_the_default_widths(qtbot, window, tiny_model_dir,
                                                                                   corpus_file, tmp_path):
    """'save about X' (studio.model_info.estimated_folder_bytes) with the default widths against the weights
    the run writes. The tiny model's rows are 64 wide, where 6-bit codes and their 64-entry tables would be
    larger than float16: the summary says the pair stays float16, and the estimate counts it so."""
    page = window.pages["quantize"]
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    config = window.session.quant_config
    assert (config.embed_bits, config.head_bits) == (6, 6) == (QuantConfig().embed_bits, QuantConfig().head_bits)
    estimate = estimated_folder_bytes(window.session.info, config)
    assert ("token embedding and head (tied: stored once) as float16 (6-bit codes would not be smaller on rows "
            "this narrow)") in page.summary_label.text()
    small_calibration(window, corpus_file)
    window.show_page("quantize")
    page.output_picker.set_value(str(tmp_path / "q"))
    assert run_and_wait(qtbot, window, page.run_button.click) == "done"
    written = sum(p.stat().st_size for p in (tmp_path / "q").glob("*.safetensors"))
    # the projections' sparse shares are estimated from the default targets; the safetensors header and the
    # tokenizer and config files, copied as they are, are not in the estimate
    assert abs(estimate - written) <= 0.02 * written, (estimate, written)
