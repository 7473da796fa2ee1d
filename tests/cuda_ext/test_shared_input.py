"""Sibling layers that read the same input (q/k/v, gate/up) run as one CPU-kernel call, same numbers."""

from __future__ import annotations

import pytest
import torch

import cuda_ext
from core import kernels
from core.config import QuantConfig
from core.progress import run_to_end
from core.quantize import quantize_model
from core.shared_input import SharedInputGroup, link_shared_inputs
from tests.conftest import build_tiny_model
from tests.cuda_ext.test_cpu_kernel import assert_close_to_reference, random_layer


@pytest.fixture(scope="module")
def cpu():
    if not cuda_ext.is_available("cpu"):
        pytest.skip(f"CPU kernel unavailable: {cuda_ext.unavailable_reason('cpu')}")
    from cuda_ext import cpu

    return cpu


def unlink(model):
    for m in model.modules():
        if hasattr(m, "shared_input"):
            m.shared_input = None


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_many_layers_in_one_call_match_each_alone(cpu, rows):
    layers = [random_layer(192, 96, 4, bias=True, seed=1), random_layer(192, 40, 3, density=0, seed=2),
              random_layer(192, 200, 4, lut_dtype=torch.float32, seed=3)]
    x = torch.randn(rows, 192)
    keys = ("qweight", "lookup_table", "bits", "sparse_rows", "sparse_cols", "sparse_vals", "bias")
    outputs = cpu.lut_matmul_many(x, [tuple(layer[k] for k in keys) for layer in layers], 192)
    for y, layer in zip(outputs, layers):
        alone = cpu.lut_matmul(x, *(layer[k] for k in keys[:3]), 192, *(layer[k] for k in keys[3:]))
        assert torch.equal(y, alone)
        assert_close_to_reference(y, x, layer)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_quantized_model_links_its_siblings_and_decodes_the_same(cpu, arch):
    model = build_tiny_model(arch)
    run_to_end(quantize_model(model, QuantConfig(bits=4)))
    blocks = model.model.layers
    assert all(isinstance(b.self_attn.q_proj.shared_input, SharedInputGroup) for b in blocks)
    assert blocks[0].mlp.gate_proj.shared_input is blocks[0].mlp.up_proj.shared_input
    assert blocks[0].mlp.down_proj.shared_input is None
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        linked = [model(input_ids=ids[:, :n]).logits for n in (1, 12)]
        unlink(model)
        alone = [model(input_ids=ids[:, :n]).logits for n in (1, 12)]
    assert all(torch.equal(a, b) for a, b in zip(linked, alone))
    assert link_shared_inputs(model) == 2 * len(blocks)


def test_another_input_or_the_torch_path_computes_the_layer_alone(cpu, monkeypatch):
    model = build_tiny_model("llama")
    run_to_end(quantize_model(model, QuantConfig(bits=3)))
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with torch.inference_mode():
        expected_k2 = kernels.lut_matmul(x2, *attn.k_proj.kernel_arguments()[:3], 64,
                                         *attn.k_proj.kernel_arguments()[3:])
        attn.q_proj(x1)  # leaves k(x1) and v(x1) pending
        assert torch.equal(attn.k_proj(x2), expected_k2)  # not the pending k(x1)
        monkeypatch.setenv("SQUEEZE_KERNELS", "torch")
        assert attn.q_proj.shared_input.output(attn.q_proj, x1) is None
        assert torch.allclose(attn.k_proj(x2), expected_k2, atol=1e-5)
    monkeypatch.delenv("SQUEEZE_KERNELS")
    x = torch.randn(1, 1, 64, requires_grad=True)
    assert attn.q_proj.shared_input.output(attn.q_proj, x) is None  # gradients: the torch reference
    attn.v_proj(x).sum().backward()
    assert x.grad is not None


def test_a_loaded_folder_is_linked(cpu, tmp_path, demo_tokenizer):
    from core.checkpoint import load_quantized, save_quantized

    model = build_tiny_model("mistral")
    run_to_end(quantize_model(model, QuantConfig(bits=4)))
    run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "q", {}))
    attn = load_quantized(tmp_path / "q").model.model.layers[1].self_attn
    assert attn.v_proj.shared_input is attn.q_proj.shared_input is not None


def test_a_compiled_model_computes_each_layer_alone(cpu):
    model = build_tiny_model("llama")
    run_to_end(quantize_model(model, QuantConfig(bits=4)))
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 64)

    def qkv(inputs):
        return torch.cat([attn.q_proj(inputs), attn.k_proj(inputs), attn.v_proj(inputs)], -1)

    with torch.inference_mode():
        expected = qkv(x)
        compiled = torch.compile(qkv, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), expected)
