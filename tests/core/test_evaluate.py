"""Perplexity against a hand computation, batching, the out-of-memory fallback, sizes, --compare."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.config import EvalConfig
from core.errors import UserError
from core.evaluate import (CompareRow, compare, format_compare_table, model_size_report, perplexity,
                           size_on_disk)
from core.progress import run_to_end
from tests.conftest import build_tiny_model


def random_windows(n: int, seqlen: int, seed: int = 0, vocab: int = 49152) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g, dtype=torch.long)


def hand_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean over windows of the mean cross-entropy of the window), one window at a time."""
    means = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            means.append(F.cross_entropy(logits[:-1], w[1:]).item())
    return math.exp(sum(means) / len(means))


def test_perplexity_matches_hand_computation(tiny_model):
    windows = random_windows(3, 12)
    events = []
    result = run_to_end(perplexity(tiny_model, windows, batch_size=2), events.append)
    assert result.perplexity == pytest.approx(hand_perplexity(tiny_model, windows), rel=1e-5)
    assert len(result.nll_per_window) == 3 and result.tokens == 36
    assert result.tokens_per_second > 0
    # an event per batch, ending at n
    assert [(e.done, e.total) for e in events if e.stage == "eval"] == [(0, 3), (2, 3), (3, 3)]


def test_random_model_perplexity_is_near_vocab_size():
    # a freshly initialised model guesses roughly uniformly: a sanity bound on the scale of the number
    model = build_tiny_model("llama")
    result = run_to_end(perplexity(model, random_windows(2, 32)))
    assert 0.5 * 49152 < result.perplexity < 2 * 49152


def test_batched_equals_unbatched():
    model = build_tiny_model("qwen2")
    windows = random_windows(5, 20, seed=3)
    one = run_to_end(perplexity(model, windows, batch_size=1))
    many = run_to_end(perplexity(model, windows, batch_size=4))
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-6)
    assert many.nll_per_window == pytest.approx(one.nll_per_window, rel=1e-6)


def _oom_above_batch(model, limit: int, message: str):
    original = model.forward
    sizes = []

    def forward(*args, input_ids=None, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > limit:
            raise RuntimeError(message)
        return original(*args, input_ids=input_ids, **kwargs)

    model.forward = forward
    return sizes


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_out_of_memory_halves_the_batch(message):
    model = build_tiny_model("llama")
    windows = random_windows(5, 16)
    expected = run_to_end(perplexity(model, windows, batch_size=1)).perplexity
    sizes = _oom_above_batch(model, 1, message)
    result = run_to_end(perplexity(model, windows, batch_size=4))
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert sizes[:3] == [4, 2, 1]  # halved twice, then carried on at 1
    assert len(result.nll_per_window) == 5


def test_out_of_memory_at_batch_one_is_a_user_error():
    model = build_tiny_model("llama")
    _oom_above_batch(model, 0, "DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(UserError, match="not enough memory for windows of 16 tokens"):
        run_to_end(perplexity(model, random_windows(2, 16), batch_size=2))


def test_other_runtime_errors_are_not_swallowed():
    model = build_tiny_model("llama")
    _oom_above_batch(model, 0, "mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        run_to_end(perplexity(model, random_windows(2, 16)))


def test_size_report_of_a_plain_model_is_its_dtype_bits(tiny_model):
    report = model_size_report(tiny_model)
    from core.models import quantizable_linears

    linears = quantizable_linears(tiny_model)
    assert report.n_weights == sum(m.weight.numel() for m in linears.values())
    stored = {t.untyped_storage().data_ptr(): t.numel() * 4 for t in tiny_model.state_dict().values()}
    assert report.total_bytes == sum(stored.values())
    biases = sum(m.bias.numel() for m in linears.values() if m.bias is not None)
    assert report.bits_per_weight == pytest.approx(32 * (1 + biases / report.n_weights))


def test_size_report_half_precision_is_16_bits():
    model = build_tiny_model("llama").half()
    assert model_size_report(model).bits_per_weight == pytest.approx(16.0)


def test_size_on_disk(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    assert size_on_disk(tmp_path) == 15
    assert size_on_disk(tmp_path / "a.bin") == 10
    assert size_on_disk(tmp_path / "missing") is None
    assert size_on_disk(None) is None


def test_format_compare_table():
    rows = [CompareRow("original", 26.8234, 1.0, 32.0, 538_000_000, 812.0),
            CompareRow("w4", 29.5, 1.0998, 4.61, None, 140.2)]
    table = format_compare_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") for line in lines)
    assert "26.823" in lines[2] and "1.100x" in lines[3] and "4.61" in lines[3]
    assert "513.1 MB" in lines[2] and " - " in lines[3]


@pytest.fixture
def two_saved_models(tmp_path, demo_tokenizer):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"model{seed}"
        build_tiny_model("llama", seed=seed).save_pretrained(folder)
        demo_tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return folders, str(text)


def test_compare_uses_identical_windows(two_saved_models, monkeypatch):
    import core.evaluate as evaluate

    folders, text = two_saved_models
    seen = []
    real = evaluate.perplexity

    def spy(model, windows, **kwargs):
        seen.append(windows.clone())
        return (yield from real(model, windows, **kwargs))

    monkeypatch.setattr(evaluate, "perplexity", spy)
    config = EvalConfig(source=text, windows=3, seqlen=16, batch_size=2)
    events = []
    rows = run_to_end(compare(folders + folders[:1], config), events.append)
    assert len(seen) == 3 and all(torch.equal(seen[0], w) for w in seen)
    assert seen[0].shape == (3, 16)
    assert [r.name for r in rows] == ["model0", "model1", "model0"]
    assert rows[0].delta_vs_first == 1.0
    assert rows[1].delta_vs_first == pytest.approx(rows[1].perplexity / rows[0].perplexity)
    assert rows[2].perplexity == pytest.approx(rows[0].perplexity, rel=1e-6)  # same model, same windows
    assert rows[0].bits_per_weight == pytest.approx(32.0)
    assert rows[0].size_on_disk_bytes == size_on_disk(folders[0])
    assert any(e.message.startswith("model1: ") for e in events)
    table = format_compare_table(rows)
    assert "model1" in table and f"{rows[1].perplexity:.3f}" in table


def test_compare_refuses_a_different_tokenizer(two_saved_models, tmp_path):
    from transformers import AutoTokenizer

    folders, text = two_saved_models
    tok = AutoTokenizer.from_pretrained(folders[1])
    tok.add_tokens(["<extra_token_for_test>"])
    tok.save_pretrained(folders[1])
    with pytest.raises(UserError, match="different tokenizer"):
        run_to_end(compare(folders, EvalConfig(source=text, windows=2, seqlen=16)))


def test_size_report_of_a_quantized_model_counts_stored_bits():
    from core.baselines import quantize_rtn
    from core.models import quantizable_linears

    model = build_tiny_model("llama")
    shapes = [tuple(m.weight.shape) for m in quantizable_linears(model).values()]
    embed_bytes = model.get_input_embeddings().weight.numel() * 4
    run_to_end(quantize_rtn(model, 4, None))
    report = model_size_report(model)
    assert report.n_weights == sum(o * i for o, i in shapes)
    assert report.quantized_bytes == sum(m.storage_bytes() for m in model.modules() if hasattr(m, "qweight"))
    # at least: 4-bit codes (inputs padded to 32) and an fp16 LUT of 16 entries per row
    floor = sum(-(-i // 32) * 4 * o * 4 + o * 16 * 2 for o, i in shapes)
    assert floor <= report.quantized_bytes < 1.1 * floor
    assert report.bits_per_weight == pytest.approx(8 * report.quantized_bytes / report.n_weights)
    assert embed_bytes < report.other_bytes < embed_bytes * 1.01  # tied lm_head counted once, plus norms


def test_compare_original_against_its_quantized_folder(two_saved_models, demo_tokenizer, tmp_path):
    from core.baselines import quantize_rtn
    from core.checkpoint import save_quantized

    folders, text = two_saved_models
    model = build_tiny_model("llama", seed=0)
    run_to_end(quantize_rtn(model, 4, 32))
    run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "q4", {"config": {"method": "rtn-g128"}}))
    rows = run_to_end(compare([folders[0], str(tmp_path / "q4")], EvalConfig(source=text, windows=2, seqlen=16)))
    assert rows[1].name == "q4" and rows[1].bits_per_weight == pytest.approx(4 + 32 / 32)  # fp16 min + scale per 32
    assert rows[1].delta_vs_first == pytest.approx(rows[1].perplexity / rows[0].perplexity)
    assert 0.8 < rows[1].delta_vs_first < 1.25  # random tiny model: 4-bit barely moves it
    assert rows[1].size_on_disk_bytes < rows[0].size_on_disk_bytes
