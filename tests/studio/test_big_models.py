"""The studio on models bigger than memory, through a tiny bf16 model saved as sharded safetensors: the
Model page opens it without reading a weight, Inspect reads one matrix for a histogram and condenses
the whole model block by block (progress, cancel, on-disk cache), Evaluate and Chat run it in bf16."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tests.studio.helpers import open_model, run_and_wait, wait_idle


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, demo_tokenizer):
    """The tiny LLaMA stored in bfloat16, in several safetensors shards with an index."""
    from tests.conftest import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-bf16")
    build_tiny_model("llama").to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
    demo_tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh cache folder (outlier statistics, Fisher), so cached results of other tests do not count."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def tensor_reads(monkeypatch):
    """Names of the tensors read from the weight files (core.lazy_model.LazyModel.tensor), in order."""
    from core.lazy_model import LazyModel

    reads: list[str] = []
    original = LazyModel.tensor

    def spy(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(LazyModel, "tensor", spy)
    return reads


@pytest.fixture
def no_auto_analysis(monkeypatch):
    """Inspect analyses nothing by itself (as for a model over AUTO_ANALYSE_BYTES)."""
    monkeypatch.setattr("studio.pages.inspect.AUTO_ANALYSE_BYTES", 0)


def _open(qtbot, window, folder) -> None:
    """Open ``folder`` and wait until the Inspect page has drawn the first matrix's histogram."""
    assert open_model(qtbot, window, folder) == "done"
    wait_idle(qtbot, window)
    qtbot.waitUntil(lambda: window.pages["inspect"].weight_hist.has_data)


def _stored(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(file))
    return state


def test_model_page_opens_an_original_without_reading_its_weights(qtbot, window, bf16_dir, tensor_reads,
                                                                  no_auto_analysis):
    from studio.original import OriginalModel

    _open(qtbot, window, bf16_dir)
    # shapes and dtypes came from the safetensors headers; the one matrix read is the histogram Inspect draws
    assert tensor_reads == ["model.layers.0.self_attn.q_proj.weight"]
    model = window.session.model
    assert isinstance(model, OriginalModel)
    assert all(p.is_meta for p in model.lazy.skeleton.parameters())
    page = window.pages["model"]
    assert page.layers_table.rowCount() == 14
    assert page.layers_table.item(0, 1).text() == "64 × 64"
    assert {page.layers_table.item(r, 3).text() for r in range(14)} == {"bfloat16"}
    info = window.session.info
    stored_bytes = sum(t.numel() * t.element_size() for t in _stored(bf16_dir).values())
    assert info.memory_bytes == stored_bytes + info.resident_bytes  # the files' tensors + rotary buffers
    assert page.facts["stored"].text().startswith("bfloat16")
    assert "on disk" in page.facts["stored"].text()
    assert "stay on disk" in page.facts["memory"].text()
    assert info.resident_bytes < 4096  # nothing but the rotary frequencies
    assert page.facts["plan"].text().startswith("about ") and "free now" in page.facts["plan"].text()
    plan = page.facts["plan"].text()
    window.pages["quantize"].calibration_form.editors["samples"].setValue(400)
    assert page.facts["plan"].text() != plan and "400 windows" in page.facts["plan"].text()
    assert info.estimated_bytes[3] < info.estimated_bytes[4] < info.memory_bytes


def test_inspect_draws_a_histogram_from_one_matrix_of_the_shards(qtbot, window, bf16_dir, tensor_reads,
                                                                 no_auto_analysis):
    from studio.plots.histogram import value_histogram

    assert open_model(qtbot, window, bf16_dir) == "done"
    wait_idle(qtbot, window)
    page = window.pages["inspect"]
    name = "model.layers.1.mlp.down_proj"
    page.select_matrix(name)
    qtbot.waitUntil(lambda: page.weight_hist.counts.sum() == 64 * 160)
    assert tensor_reads[-1] == f"{name}.weight" and set(tensor_reads) <= {
        "model.layers.0.self_attn.q_proj.weight", f"{name}.weight"}  # the first selection, then this one
    expected, _ = value_histogram(_stored(bf16_dir)[f"{name}.weight"])
    assert (page.weight_hist.counts == expected).all()
    assert window.session.model.dense is None  # nothing loaded whole
    assert window.session.stats is None and "press Analyse" in page.analyse_status.text()


def test_outlier_statistics_block_by_block_with_progress_and_cache(qtbot, window, bf16_dir, own_cache,
                                                                   tensor_reads, no_auto_analysis):
    from core.outliers import OutlierStats

    _open(qtbot, window, bf16_dir)
    page = window.pages["inspect"]
    tensor_reads.clear()
    events = []
    window.runner.progress.connect(lambda p: events.append(p.event))
    assert run_and_wait(qtbot, window, page.analyse_button.click) == "done"
    stats = window.session.stats
    assert [m.name for m in stats] == window.session.model.matrix_names()
    assert sorted(tensor_reads) == sorted(f"{m.name}.weight" for m in stats)  # each matrix read once
    # the same statistics as from the whole model in memory
    stored = _stored(bf16_dir)
    for m in stats:
        whole = OutlierStats.of(stored[f"{m.name}.weight"])
        assert (m.stats.q1, m.stats.q3, m.stats.numel) == (whole.q1, whole.q3, whole.numel)
        assert torch.equal(m.stats.values, whole.values) and torch.equal(m.stats.ends, whole.ends)
    # progress: matrix by matrix, each block named when it is done
    counts = [e.done for e in events if e.stage == "stats" and e.total]
    assert counts == sorted(counts) and counts[-1] == 14
    assert [e.item for e in events if e.item] == ["model.layers.0", "model.layers.1"]
    assert page.analyse_panel.stage_bars["stats"].value() == 1000
    assert "14 matrices analysed" in page.analyse_status.text()
    qtbot.waitUntil(lambda: page.readouts["bits"].text() != "–", timeout=10000)
    # cached on disk: one file per block; opening the model again reads no weight
    files = sorted(p.name for p in own_cache.glob("outlier-stats/*/block-*.safetensors"))
    assert files == ["block-00000.safetensors", "block-00001.safetensors"]
    assert open_model(qtbot, window, bf16_dir) == "done"
    wait_idle(qtbot, window)
    tensor_reads.clear()
    assert run_and_wait(qtbot, window, page.analyse_button.click) == "done"
    assert not any(".mlp." in name or ".layers.1." in name for name in tensor_reads)  # at most Inspect's histogram
    assert [m.stats.q3 for m in window.session.stats] == [m.stats.q3 for m in stats]
    for cached, computed in zip(window.session.stats, stats):  # the exact value counts come back
        assert torch.equal(cached.stats.values, computed.stats.values)
        assert torch.equal(cached.stats.ends, computed.stats.ends)


def test_cancelled_statistics_keep_finished_blocks_and_resume(qtbot, window, bf16_dir, own_cache, tensor_reads,
                                                             no_auto_analysis, monkeypatch):
    import core.lazy_stats

    original = core.lazy_stats.matrix_stats

    def slow(lazy, name):
        time.sleep(0.3)
        return original(lazy, name)

    monkeypatch.setattr(core.lazy_stats, "matrix_stats", slow)
    _open(qtbot, window, bf16_dir)
    page = window.pages["inspect"]
    finished_block = []
    window.runner.progress.connect(lambda p: finished_block.append(p.event.item) if p.event.item else None)
    with qtbot.waitSignal(window.runner.finished, timeout=30000) as blocker:
        page.analyse_button.click()
        qtbot.waitUntil(lambda: finished_block == ["model.layers.0"], timeout=20000)
        page.analyse_panel.cancel_button.click()
    assert blocker.args[1] == "cancelled"
    assert window.session.stats is None and page.analyse_button.isEnabled()
    assert "Analyse resumes" in page.analyse_panel.eta_label.text()
    assert [p.name for p in own_cache.glob("outlier-stats/*/block-*.safetensors")] == ["block-00000.safetensors"]
    tensor_reads.clear()
    assert run_and_wait(qtbot, window, page.analyse_button.click) == "done"
    assert {name.split(".")[2] for name in tensor_reads} == {"1"}  # only the unfinished block was read
    assert len(window.session.stats) == 14


def test_evaluate_and_chat_run_a_bf16_original_in_bf16(qtbot, window, bf16_dir, corpus_file, no_auto_analysis):
    assert open_model(qtbot, window, bf16_dir) == "done"
    wait_idle(qtbot, window)
    window.show_page("evaluate")
    evaluate = window.pages["evaluate"]
    evaluate.eval_form.editors["source"].set_value(str(corpus_file))
    evaluate.eval_form.editors["windows"].setValue(2)
    evaluate.eval_form.editors["seqlen"].setValue(64)
    assert run_and_wait(qtbot, window, evaluate.run_button.click) == "done"
    dense = window.session.model.dense
    assert dense is not None and dense.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in dense.model.parameters())
    assert math.isfinite(evaluate.runs[-1]["perplexity"]) and evaluate.runs[-1]["perplexity"] > 1
    # Chat answers with the same loaded model (no second load)
    window.show_page("chat")
    chat = window.pages["chat"]
    chat.settings_form.editors["max_new_tokens"].setValue(3)
    chat.settings_form.editors["temperature"].setValue(0.0)
    chat.input_edit.setPlainText("Hello")
    assert run_and_wait(qtbot, window, chat.send_button.click) == "done"
    assert window.session.model.dense is dense
    assert len(chat.chats["left"].history) == 2


def test_whole_model_sensitivity_that_does_not_fit_is_refused_with_the_way_out(qtbot, window, bf16_dir,
                                                                             corpus_file, monkeypatch,
                                                                             no_auto_analysis):
    import core.memory_plan

    assert open_model(qtbot, window, bf16_dir) == "done"
    wait_idle(qtbot, window)
    monkeypatch.setattr(core.memory_plan, "available_memory", lambda: 1 << 20)
    page = window.pages["inspect"]
    with qtbot.waitSignal(window.reporter.shown, timeout=10000) as shown:
        assert run_and_wait(qtbot, window, page.compute_button.click) == "failed"
    assert "needs about" in shown.args[0] and "Quantize page" in shown.args[0]
    window.reporter.last_dialog.accept()
    assert window.session.fisher is None


def test_a_quantized_folder_opens_without_dense_weights(qtbot, window, quantized_dir):
    from torch import nn

    from studio.model_info import quantized_modules

    assert open_model(qtbot, window, quantized_dir) == "done"
    wait_idle(qtbot, window)
    model = window.session.model.model
    layers = quantized_modules(model)
    assert len(layers) == 14
    assert not any(isinstance(module, nn.Linear) for name, module in model.named_modules() if ".layers." in name)
    dense_bytes = sum(layer.out_features * layer.in_features * 4 for layer in layers.values())
    # 4-bit codes + a 16-entry LUT per 64-wide row + the sparse part: about a quarter of float32 here
    assert sum(int(layer.storage_bytes()) for layer in layers.values()) < dense_bytes / 3


def test_quantize_page_runs_two_workers(qtbot, window, tiny_model_dir, corpus_file, tmp_path):
    from tests.studio.helpers import small_calibration

    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    small_calibration(window, corpus_file)
    window.show_page("quantize")
    page = window.pages["quantize"]
    page.workers_spin.setValue(2)
    assert "2 worker processes" in page.summary_label.text()
    output = tmp_path / "tiny-sq4-2w"
    page.output_picker.set_value(str(output))
    assert run_and_wait(qtbot, window, page.run_button.click, timeout=300000) == "done"
    assert (output / "config.json").is_file()
    assert "rank 0 of 2" in page.panel.log_view.toPlainText()
    assert window.session.latest_result.path == output.resolve()
    assert all(page.layers_table.item(r, 1).text() == "done" for r in range(14))
