"""The float16 token embedding / output head: same numbers as float32 sums over fp16-rounded
weights, ties kept, stored in fp16 by quantized folders and loaded back without a copy."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from core import kernels
from core.checkpoint import load_quantized, save_quantized
from core.config import OutlierConfig, QuantConfig
from core.half_head import HalfEmbedding, HalfLinear, halve_embeddings
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import TINY_ARCHS, build_tiny_model


def rounded_copy(model):
    """model with its embedding/head weights rounded to fp16 but still fp32 nn modules (the oracle)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.weight.data = module.weight.data.half().float()
    return model


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_half_linear_matches_fp32_sums_of_fp16_weights(monkeypatch, kernel, rows):
    monkeypatch.setenv("SQUEEZE_KERNELS", kernel)
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 77, generator=g).half()  # in=77: a tail after the 8-wide steps
    bias = torch.randn(300, generator=g)
    x = torch.randn(2, rows, 77, generator=g)
    expected = F.linear(x, weight.float(), bias)
    y = kernels.half_linear(x, weight, bias)
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert kernels.half_linear(x.bfloat16(), weight).dtype == torch.bfloat16


def test_half_linear_rejects_a_wrong_width():
    with pytest.raises(ValueError, match="features"):
        kernels.half_linear(torch.randn(1, 5), torch.randn(3, 4).half())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_halving_keeps_ties_and_matches_the_rounded_model(arch):
    model = build_tiny_model(arch)
    reference = rounded_copy(build_tiny_model(arch))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert halve_embeddings(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, HalfEmbedding) and isinstance(head, HalfLinear)
    assert embedding.weight.dtype == torch.float16
    assert (head.weight is embedding.weight) == tied
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        got, expected = model(ids).logits, reference(ids).logits
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert halve_embeddings(model)  # a second call changes nothing
    assert model.get_input_embeddings() is embedding


def test_non_fp32_models_and_out_of_range_weights_are_left_alone():
    model = build_tiny_model("llama").to(torch.bfloat16)
    assert not halve_embeddings(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] = 1e6
    assert not halve_embeddings(model)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_quantized_folder_stores_fp16_embeddings_and_loads_them_back_exactly(tmp_path, demo_tokenizer, arch):
    model = build_tiny_model(arch)
    config = QuantConfig(bits=3, outliers=OutlierConfig(percent=None), sensitivity_percent=0.0, embed_bits=16,
                         head_bits=16)  # float16 embedding and head (the default is 6-bit codes)
    run_to_end(quantize_model(model, config, {n: torch.rand(m.weight.shape) for n, m in model.named_modules()
                                              if isinstance(m, torch.nn.Linear) and "layers" in n}))
    out = run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "q", {}))
    assert isinstance(model.get_input_embeddings(), HalfEmbedding)  # the model in memory is the one saved
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["embeddings_dtype"] == "float16"
    loaded = load_quantized(out).model
    embedding = loaded.get_input_embeddings()
    assert isinstance(embedding, HalfEmbedding) and embedding.weight.dtype == torch.float16
    assert isinstance(loaded.get_output_embeddings(), HalfLinear)
    assert (loaded.get_output_embeddings().weight is embedding.weight) == \
        (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    assert torch.equal(embedding.weight, model.get_input_embeddings().weight)
    assert next(p for p in loaded.parameters()).dtype == torch.float32
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
