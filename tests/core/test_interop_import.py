"""Importing the original SqueezeLLM's packed .pt (SPEC C.2) reproduces its dequantization exactly.

The checkpoints are written here by a writer that follows SPEC C.2 and packs codes with its own
bit-stream packer (not core.packing), from random codes, LUTs and residuals whose dense weight
``LUT[codes] + S (+ full rows)`` the test knows independently.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.checkpoint import load_quantized
from core.errors import UserError
from core.interop.original_pt import import_original_checkpoint
from core.layers import SqueezeLinear
from core.models import quantizable_linears
from core.progress import run_to_end
from tests.conftest import build_tiny_model


def pack_like_original(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [out, in] -> int32 [in/32*bits, out]: per group of 32 inputs one little-endian bit
    stream of 32*bits bits, code k at stream bits bits*k .. bits*k+bits-1 (SPEC A.6)."""
    out_features, in_features = codes.shape
    groups = in_features // 32
    grouped = codes.T.astype(np.uint64).reshape(groups, 32, 1, out_features)
    code_bits = (grouped >> np.arange(bits, dtype=np.uint64)[:, None]) & np.uint64(1)  # [g, 32, bits, out]
    stream = code_bits.reshape(groups, bits, 32, out_features)  # stream bit 32*w + j -> word w, bit j
    words = (stream << np.arange(32, dtype=np.uint64)[:, None]).sum(axis=2, dtype=np.uint64)
    return words.reshape(-1, out_features).astype(np.uint32).view(np.int32)


def write_original(path, model, bits, *, sparse=False, full_rows=False, quantized_only=False,
                   dtype=torch.float16, seed=0) -> dict[str, torch.Tensor]:
    """Write an original-format checkpoint for ``model``; returns name -> expected float32 [out, in]."""
    gen = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for name, linear in quantizable_linears(model).items():
        out_features, in_features = linear.weight.shape
        codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen)
        lut = torch.randn(out_features, 1 << bits, generator=gen) * 0.05
        weight = lut.gather(1, codes)
        state[f"{name}.qweight"] = torch.from_numpy(pack_like_original(codes.numpy(), bits))
        state[f"{name}.lookup_table"] = lut
        if sparse:
            mask = torch.rand(out_features, in_features, generator=gen) < 0.03
            residual = torch.where(mask, torch.randn(out_features, in_features, generator=gen), 0.0)
            # CSR over output rows (what torch's to_sparse_csr gives, built directly: it is faster)
            state[f"{name}.rows"] = torch.cat([torch.zeros(1), mask.sum(1).cumsum(0)]).to(torch.int32)
            state[f"{name}.cols"] = mask.nonzero()[:, 1].to(torch.int32)
            state[f"{name}.vals"] = residual[mask].to(torch.float32)
            state[f"sparse_threshold.{name}"] = int(mask.sum())
            state[f"{name}.startrows"] = torch.zeros(128, dtype=torch.int32)  # ignored on load
            weight = weight + residual
        if full_rows:
            rows = torch.randperm(out_features, generator=gen)[:3].to(torch.int32)
            dense_rows = torch.randn(in_features, 3, generator=gen) * 0.1
            state[f"{name}.full_rows"] = dense_rows
            state[f"{name}.full_row_indices"] = rows
            weight = weight.index_add(0, rows.long(), dense_rows.t())
        expected[name] = weight
    if not quantized_only:
        for key, value in model.state_dict().items():
            if key.removesuffix(".weight") not in expected:
                state[key] = value.to(dtype)
    torch.save(state, path)
    return expected


def reference_model(model, expected, dtype=torch.float32, arch="llama"):
    """The dense model the original's dequantization describes (linears hold the expected weights)."""
    reference = build_tiny_model(arch)
    reference.load_state_dict(model.state_dict())
    for name, weight in expected.items():
        reference.get_submodule(name).weight.data = weight.clone()
    return reference.to(dtype)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, demo_tokenizer):
    model = build_tiny_model("llama")
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return model, folder


def _squeeze_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SqueezeLinear)}


def _check_weights(folder, expected, exact=True):
    loaded = load_quantized(folder)
    layers = _squeeze_layers(loaded.model)
    assert layers.keys() == expected.keys()
    for name, layer in layers.items():
        assert layer.lut_dtype == torch.float32
        if exact:
            assert torch.equal(layer.dequantize(), expected[name]), name
        else:  # one float32 addition is ordered differently when dense rows are folded in
            torch.testing.assert_close(layer.dequantize(), expected[name], rtol=0, atol=1e-6)
    return loaded


@pytest.mark.parametrize("bits,sparse", [(4, False), (3, False), (4, True), (3, True)])
def test_import_reproduces_the_original_dequantization(tmp_path, tiny_base, bits, sparse):
    model, base = tiny_base
    expected = write_original(tmp_path / "sq.pt", model, bits, sparse=sparse, dtype=torch.float32)
    out = run_to_end(import_original_checkpoint(tmp_path / "sq.pt", str(base), tmp_path / "out"))
    loaded = _check_weights(out, expected)
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["config"]["bits"] == bits and block["imported_from"]["format"] == "squeezellm-pt"
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference_model(model, expected)(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_hybrid_dense_rows_are_folded_into_the_residual(tmp_path, tiny_base):
    model, base = tiny_base
    expected = write_original(tmp_path / "sq.pt", model, 3, sparse=True, full_rows=True)
    out = run_to_end(import_original_checkpoint(tmp_path / "sq.pt", str(base), tmp_path / "out", bits=3))
    loaded = _check_weights(out, expected, exact=False)
    assert next(loaded.model.parameters()).dtype == torch.float16  # the file's dense dtype is kept
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["imported_from"]["dense_rows_folded"] == 3 * len(expected)


def test_quantized_only_file_takes_the_rest_from_base(tmp_path, tiny_base):
    model, base = tiny_base
    expected = write_original(tmp_path / "sq.pt", model, 3, quantized_only=True)
    with pytest.raises(UserError, match="--base"):
        run_to_end(import_original_checkpoint(tmp_path / "sq.pt", None, tmp_path / "nobase"))
    out = run_to_end(import_original_checkpoint(tmp_path / "sq.pt", str(base), tmp_path / "out"))
    loaded = _check_weights(out, expected)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["imported_from"][
        "tensors_from_base"] > 0
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference_model(model, expected)(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_biases_the_file_lacks_come_from_the_base(tmp_path, demo_tokenizer):
    model = build_tiny_model("qwen2")  # q/k/v projections carry biases
    model.save_pretrained(tmp_path / "base")
    demo_tokenizer.save_pretrained(tmp_path / "base")
    expected = write_original(tmp_path / "sq.pt", model, 4, quantized_only=True)
    out = run_to_end(import_original_checkpoint(tmp_path / "sq.pt", str(tmp_path / "base"), tmp_path / "out"))
    loaded = _check_weights(out, expected)
    assert torch.equal(loaded.model.model.layers[1].self_attn.k_proj.bias, model.model.layers[1].self_attn.k_proj.bias)
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits,
                                   reference_model(model, expected, arch="qwen2")(ids).logits, rtol=1e-4, atol=1e-4)


def test_checkpoint_in_a_model_folder_needs_no_base(tmp_path, tiny_base, demo_tokenizer):
    model, _ = tiny_base
    folder = tmp_path / "vllm-style"
    folder.mkdir()
    model.config.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    expected = write_original(folder / "sq.pt", model, 4, dtype=torch.float32)
    out = run_to_end(import_original_checkpoint(folder / "sq.pt", None, tmp_path / "out"))
    _check_weights(out, expected)


class NotATensor:
    """A custom class: unpickling it would run code from the test module."""


def test_files_needing_code_are_refused(tmp_path, tiny_base):
    _, base = tiny_base
    torch.save({"model.layers.0.self_attn.q_proj.qweight": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refuses to unpickle code"):
        run_to_end(import_original_checkpoint(tmp_path / "evil.pt", str(base), tmp_path / "out"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        run_to_end(import_original_checkpoint(tmp_path / "junk.pt", str(base), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mismatched_checkpoints_are_refused(tmp_path, tiny_base):
    model, base = tiny_base
    write_original(tmp_path / "sq.pt", model, 3)
    with pytest.raises(UserError, match="not 4-bit|--bits"):
        run_to_end(import_original_checkpoint(tmp_path / "sq.pt", str(base), tmp_path / "out", bits=4))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "dense.pt")
    with pytest.raises(UserError, match="no quantized layers"):
        run_to_end(import_original_checkpoint(tmp_path / "dense.pt", str(base), tmp_path / "out"))
    state = torch.load(tmp_path / "sq.pt", weights_only=True)
    state["model.layers.0.mlp.not_there.qweight"] = state["model.layers.0.mlp.up_proj.qweight"]
    state["model.layers.0.mlp.not_there.lookup_table"] = state["model.layers.0.mlp.up_proj.lookup_table"]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a linear layer of the base model"):
        run_to_end(import_original_checkpoint(tmp_path / "other.pt", str(base), tmp_path / "out"))


@pytest.mark.demo
def test_llama_v1_style_file_with_the_demo_model_as_base(tmp_path):
    """Real shapes (576 hidden, 192-wide k/v, 30 blocks): a quantized-linears-only file + --base demo."""
    from core.models import load_model

    demo = load_model("demo").model
    expected = write_original(tmp_path / "sq.pt", demo, 3, sparse=True, quantized_only=True)
    out = run_to_end(import_original_checkpoint(tmp_path / "sq.pt", "demo", tmp_path / "out", bits=3))
    loaded = _check_weights(out, expected)
    assert torch.equal(loaded.model.model.embed_tokens.weight.float(), demo.model.embed_tokens.weight.float())
