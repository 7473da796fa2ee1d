"""A result whose token embedding and head are lookup-table codes (core.embed_head) opens in the studio,
and Inspect lists them after the decoder blocks."""

from __future__ import annotations

import pytest

from tests.studio.helpers import open_model, wait_idle


@pytest.fixture(scope="module")
def embed_head_dir(tmp_path_factory, tiny_model_dir, corpus_file):
    """The tiny model (tied embedding and head) quantized to 4 bits with a 4-bit embedding / head (on its
    64-wide rows 6-bit codes and their lookup table would not be smaller than float16, and stay float16)."""
    from core.config import CalibrationConfig, QuantConfig
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    output = tmp_path_factory.mktemp("embed-head") / "tiny-sq4-e4"
    job = QuantizeJob(model=str(tiny_model_dir), output=output, device="cpu",
                      config=QuantConfig(bits=4, embed_bits=4, head_bits=4),
                      calibration=CalibrationConfig(source=str(corpus_file), samples=2, seqlen=64))
    run_to_end(run_quantize_job(job))
    return output


def test_inspect_lists_a_quantized_embedding_after_the_blocks(qtbot, window, embed_head_dir):
    assert open_model(qtbot, window, embed_head_dir) == "done"  # was: "names no decoder block"
    wait_idle(qtbot, window)
    assert window.reporter.last_dialog is None
    page = window.pages["inspect"]
    tree = page.matrix_tree
    titles = [tree.topLevelItem(i).text(0) for i in range(tree.topLevelItemCount())]
    assert titles == ["Block 0", "Block 1", "Embedding and head"]
    last = tree.topLevelItem(2)
    names = [last.child(i).data(0, 0x0100) for i in range(last.childCount())]  # Qt.ItemDataRole.UserRole
    assert names == ["model.embed_tokens"]  # tied: one module serves both
    assert page.selected_matrix() == "model.layers.0.self_attn.q_proj"  # the first block stays the default
    page.select_matrix("model.embed_tokens")
    qtbot.waitUntil(lambda: page.weight_hist.counts.sum() == 49152 * 64, timeout=30000)
