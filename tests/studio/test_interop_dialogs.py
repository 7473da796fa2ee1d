"""Import and export in the studio, through the dialogs' own widgets: an original checkpoint imported and
opened, each export format written, squeezellm-pt refused for a 3-bit model with the reason shown,
errors as the studio's error dialog, and a cancelled export that leaves nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from core.config import EvalConfig
from core.layers import SqueezeLinear
from studio import storage
from tests.conftest import build_tiny_model
from tests.core.test_interop_export import DENSE_ONLY_4BIT, SPARSE_3BIT, quantized_folder
from tests.core.test_interop_import import NotATensor, write_original
from tests.studio.helpers import open_model, run_and_wait, wait_idle


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A 4-bit checkpoint in the original's packed format for the tiny LLaMA of ``tiny_model_dir``
    (same config and seed), with the dequantized weight each layer must end up with."""
    path = tmp_path_factory.mktemp("original") / "sq-tiny-w4-s0.pt"
    expected = write_original(path, build_tiny_model("llama"), 4)
    return path, expected


@pytest.fixture(scope="module")
def dense_only_4bit(tmp_path_factory, demo_tokenizer):
    return quantized_folder(tmp_path_factory.mktemp("q") / "tiny-q4-dense", demo_tokenizer, DENSE_ONLY_4BIT)


@pytest.fixture(scope="module")
def sparse_3bit(tmp_path_factory, demo_tokenizer):
    return quantized_folder(tmp_path_factory.mktemp("q") / "tiny-q3-sparse", demo_tokenizer, SPARSE_3BIT)


def _import_dialog(window):
    page = window.pages["model"]
    page.import_button.click()
    dialog = page.import_dialog
    assert dialog.isVisible()
    return dialog


def _export_dialog(qtbot, window, folder):
    assert open_model(qtbot, window, folder) == "done"
    wait_idle(qtbot, window)
    page = window.pages["model"]
    assert page.export_button.isEnabled() and page.export_action.isEnabled()
    page.export_action.trigger()  # what the button and File > Export… do
    dialog = page.export_dialog
    assert dialog.isVisible() and dialog.selected().path == Path(folder)
    return dialog


def test_import_through_the_dialog_opens_the_model(qtbot, window, tiny_model_dir, original_checkpoint, tmp_path):
    checkpoint, expected = original_checkpoint
    dialog = _import_dialog(window)
    assert not dialog.run_button.isEnabled()  # nothing chosen yet
    dialog.checkpoint_picker.set_value(str(checkpoint))
    assert Path(dialog.output_picker.value()).name == "sq-tiny-w4-s0"  # named after the checkpoint
    dialog.base_combo.setCurrentText(str(tiny_model_dir))
    output = tmp_path / "imports" / "tiny-w4"
    dialog.output_picker.set_value(str(output))
    assert run_and_wait(qtbot, window, dialog.run_button.click) == "done"
    model = window.session.model
    assert model is not None and model.quantized and Path(model.source) == output
    assert not dialog.isVisible()
    assert window.pages["model"].facts["name"].text().endswith("(quantized)")
    layers = {n: m for n, m in model.model.named_modules() if isinstance(m, SqueezeLinear)}
    assert layers.keys() == expected.keys()
    name = next(iter(expected))
    assert torch.equal(layers[name].dequantize(), expected[name])  # the checkpoint's weights, bit for bit
    assert storage.last_folder(storage.IMPORT_OUTPUT) == str(output.parent)
    assert storage.last_folder(storage.IMPORT_CHECKPOINT) == str(checkpoint.parent)
    # opened again, the dialog offers a fresh folder in the remembered place
    dialog = _import_dialog(window)
    assert Path(dialog.output_picker.value()).parent == output.parent
    assert not Path(dialog.output_picker.value()).exists()


@pytest.mark.parametrize("case", ["code", "junk", "missing-base"])
def test_import_errors_reach_the_error_dialog(qtbot, window, tiny_model_dir, original_checkpoint, tmp_path, case):
    if case == "code":
        checkpoint, base, words = tmp_path / "evil.pt", str(tiny_model_dir), "refuses to unpickle code"
        torch.save({"model.layers.0.self_attn.q_proj.qweight": NotATensor()}, checkpoint)
    elif case == "junk":
        checkpoint, base, words = tmp_path / "junk.pt", str(tiny_model_dir), "not a readable PyTorch checkpoint"
        checkpoint.write_bytes(b"not a checkpoint at all")
    else:
        checkpoint, base, words = original_checkpoint[0], str(tmp_path / "no-such-model"), "no such file or folder"
    dialog = _import_dialog(window)
    dialog.checkpoint_picker.set_value(str(checkpoint))
    dialog.base_combo.setCurrentText(base)
    output = tmp_path / "out" / "imported"
    dialog.output_picker.set_value(str(output))
    with qtbot.waitSignal(window.reporter.shown, timeout=30000) as shown:
        assert run_and_wait(qtbot, window, dialog.run_button.click) == "failed"
    assert words in shown.args[0] and "Traceback" not in shown.args[0]
    assert window.reporter.last_dialog.informativeText() == shown.args[0]
    window.reporter.last_dialog.accept()
    assert dialog.isVisible() and dialog.run_button.isEnabled()  # fix the input and try again
    assert "nothing was written" in dialog.result_label.text()
    assert not output.exists() and window.session.model is None


@pytest.mark.parametrize("fmt", ["squeezellm-pt", "hf-dense", "gguf"])
def test_export_writes_each_format(qtbot, window, dense_only_4bit, corpus_file, tmp_path, fmt, monkeypatch):
    window.session.eval_config = EvalConfig(source=str(corpus_file), windows=8, seqlen=64, batch_size=2)
    dialog = _export_dialog(qtbot, window, dense_only_4bit)
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData(fmt))
    default = Path(dialog.output_picker.value())
    assert default.parent == dense_only_4bit.parent and not default.exists()
    assert default.name.endswith(".gguf") == (fmt == "gguf")
    assert dialog.measure_check.isVisible() == (fmt == "hf-dense")
    output = tmp_path / "exports" / ("tiny.gguf" if fmt == "gguf" else "tiny-export")
    dialog.output_picker.set_value(str(output))
    overall = []
    window.runner.progress.connect(lambda progress: overall.append(progress.overall))
    assert run_and_wait(qtbot, window, dialog.run_button.click) == "done"
    assert overall == sorted(overall) and overall[-1] > 0.99  # the bar fills steadily, to the end
    text = dialog.result_label.text()
    assert f"Wrote {output}" in text
    if fmt == "squeezellm-pt":
        assert (output / "model.pt").is_file() and (output / "quant_config.json").is_file()
        assert "128" in text  # the tiny model's 64-wide layers get vLLM's block-size warning
    elif fmt == "hf-dense":
        assert (output / "config.json").is_file() and list(output.glob("*.safetensors"))
        assert "Perplexity on 4 windows of 64 tokens" in text  # at most 4 windows of the Evaluate page's text
        assert "quantized <b>" in text and "exported float16 <b>" in text
    else:
        assert output.read_bytes()[:4] == b"GGUF"
    assert storage.last_folder(storage.EXPORT_OUTPUT) == str(output.parent)
    assert Path(dialog.output_picker.value()).parent == output.parent  # the next export: a fresh name there
    assert not Path(dialog.output_picker.value()).exists()
    opened = []
    monkeypatch.setattr("studio.dialogs.common.QDesktopServices.openUrl", lambda url: opened.append(url))
    assert dialog.show_button.isVisible()
    dialog.show_button.click()
    assert [Path(url.toLocalFile()) for url in opened] == [output if output.is_dir() else output.parent]


def test_squeezellm_pt_is_refused_for_a_3bit_model_with_the_reason(qtbot, window, sparse_3bit):
    dialog = _export_dialog(qtbot, window, sparse_3bit)
    combo = dialog.format_combo
    assert not combo.model().item(combo.findData("squeezellm-pt")).isEnabled()
    assert dialog.fmt == "hf-dense"
    assert dialog.reason_label.isVisible() and "3-bit" in dialog.reason_label.text()
    assert "vLLM" in dialog.reason_label.text()
    dialog.format_combo.setCurrentIndex(combo.findData("gguf"))  # gguf takes float16 or float32 only
    assert not dialog.dtype_combo.model().item(dialog.dtype_combo.findData("bfloat16")).isEnabled()
    file_menu = window.menuBar().actions()[0].menu()
    assert window.pages["model"].export_action in file_menu.actions()  # the same action in the menu


@pytest.fixture
def slow_dequantize(monkeypatch):
    """Every dequantized matrix takes 0.2 s longer, so that a cancel lands mid-export for sure."""
    import core.interop.export as export

    original = export.dequantize_in_place

    def slow(*args, **kwargs):
        gen = original(*args, **kwargs)
        try:
            while True:
                event = next(gen)
                time.sleep(0.2)
                yield event
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()

    monkeypatch.setattr(export, "dequantize_in_place", slow)


def test_cancelled_export_leaves_nothing(qtbot, window, sparse_3bit, tmp_path, slow_dequantize):
    dialog = _export_dialog(qtbot, window, sparse_3bit)
    output = tmp_path / "exports" / "dense"
    dialog.output_picker.set_value(str(output))
    with qtbot.waitSignal(window.runner.progress, timeout=30000,
                          check_params_cb=lambda progress: progress.event.stage == "dequantize"):
        dialog.run_button.click()
    assert not dialog.close_button.isEnabled() and not dialog.form_widget.isEnabled()
    with qtbot.waitSignal(window.runner.finished, timeout=10000) as blocker:
        dialog.reject()  # Escape while exporting cancels instead of closing
    assert blocker.args[1] == "cancelled"
    assert dialog.isVisible() and dialog.result_label.text() == "Cancelled: nothing was written."
    assert not output.exists()
    assert list(output.parent.iterdir()) == []  # no partial folder either
    assert dialog.run_button.isEnabled() and dialog.close_button.isEnabled()


def test_cancel_while_measuring_keeps_the_finished_export(qtbot, window, dense_only_4bit, corpus_file, tmp_path,
                                                         monkeypatch):
    import core.evaluate

    original = core.evaluate.perplexity

    def slow(*args, **kwargs):
        for event in (gen := original(*args, **kwargs)):
            time.sleep(0.3)
            yield event
        return None  # never reached in this test: the run is cancelled

    monkeypatch.setattr(core.evaluate, "perplexity", slow)
    window.session.eval_config = EvalConfig(source=str(corpus_file), windows=4, seqlen=64, batch_size=1)
    dialog = _export_dialog(qtbot, window, dense_only_4bit)
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData("hf-dense"))
    output = tmp_path / "dense"
    dialog.output_picker.set_value(str(output))
    with qtbot.waitSignal(window.runner.progress, timeout=30000,
                          check_params_cb=lambda progress: progress.event.stage == "measure"):
        dialog.run_button.click()
    with qtbot.waitSignal(window.runner.finished, timeout=10000) as blocker:
        dialog.panel.cancel_button.click()
    assert blocker.args[1] == "cancelled"
    assert (output / "config.json").is_file()  # complete: it was in place before the measuring began
    assert f"kept at {output}" in dialog.result_label.text() and dialog.show_button.isVisible()
