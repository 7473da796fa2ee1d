"""The token embedding and output head as LUT codes (core.embed_head): kernels against the torch
reference, lookups, tied pairs stored once, round trips through every loader, the streaming engine's
head Fisher, Gemma's scaled embedding, and bad widths refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from core import kernels
from core.checkpoint import load_quantized, save_quantized
from core.config import CalibrationConfig, OutlierConfig, QuantConfig
from core.embed_head import SqueezeEmbedding, TiedHead, dense_weights, find_embed_head, quantize_embed_head
from core.layers import SqueezeLinear
from core.packing import dense_to_csr, pack_codes
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def random_layer(out: int, inp: int, bits: int, sparse: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8)
    lut = torch.randn(out, 1 << bits, generator=g).half()
    mask = torch.rand(out, inp, generator=g) < sparse
    csr = dense_to_csr(torch.randn(out, inp, generator=g), mask)
    dense = lut.float().gather(1, codes.long()) + torch.zeros(out, inp).index_put_(
        tuple(mask.nonzero().t()), csr[2])
    return (pack_codes(codes, bits), lut, *csr), dense


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("rows", [1, 3, 9, 40])  # mat-vec (up to 8 rows) and the tiled GEMM
def test_head_kernel_matches_the_torch_reference(monkeypatch, kernel, bits, rows):
    monkeypatch.setenv("SQUEEZE_KERNELS", kernel)
    (qweight, lut, sr, sc, sv), dense = random_layer(300, 70, bits, sparse=0.02, seed=bits + rows)
    x = torch.randn(2, rows, 70, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(300)
    expected = F.linear(x, dense, bias)
    y = kernels.lut_matmul(x, qweight, lut, bits, 70, sr, sc, sv, bias)
    assert y.shape == expected.shape
    assert float((y - expected).abs().max()) <= 2e-5 * float(expected.abs().max())
    assert torch.allclose(kernels.dequantize(qweight, lut, bits, 70, sr, sc, sv), dense)


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_compiled_kernel_serves_wide_codes(bits):
    import cuda_ext

    if not cuda_ext.is_available("cpu"):
        pytest.fail("the CPU kernel does not build here: " + str(cuda_ext.build_error("cpu")))
    (qweight, lut, sr, sc, sv), dense = random_layer(64, 576, bits, sparse=0.01, seed=bits)
    assert torch.allclose(torch.ops.squeeze.dequantize_cpu(qweight, lut, bits, 576, sr, sc, sv), dense)
    x = torch.randn(1, 576)
    y = torch.ops.squeeze.lut_matmul_cpu(x, qweight, lut, bits, 576, sr, sc, sv, None)
    assert torch.allclose(y, x @ dense.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_lookup_dequantizes_exactly_the_rows_asked_for(bits):
    (qweight, lut, sr, sc, sv), dense = random_layer(500, 45, bits, sparse=0.05, seed=bits)
    ids = torch.tensor([[3, 499, 3, 0], [17, 17, 250, 1]])
    rows = kernels.lookup_rows(ids, qweight, lut, bits, 45, sr, sc, sv)
    assert rows.shape == (2, 4, 45) and torch.equal(rows, dense[ids])
    with pytest.raises(IndexError, match="out of range"):
        kernels.lookup_rows(torch.tensor([500]), qweight, lut, bits, 45, sr, sc, sv)


# Row widths at which lookup-table codes are smaller than float16 rows (core.embed_head.stored_bits;
# codes are padded to 32 values): 6 bits from 128 values a row, 8 bits from 544.
HIDDEN = 128  # 6-bit and 4-bit tables pay here
WIDE = 576  # 8-bit tables pay here (the demo model's width)


def tiny_model(arch="llama", tied=True, vocab=512, seed=0, hidden=HIDDEN):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=vocab, hidden_size=hidden)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantized_pair_serves_lookup_and_logits_within_measured_bounds(tied):
    model = tiny_model(tied=tied, hidden=WIDE)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        embed_ref = model.get_input_embeddings()(ids)
    weight = model.get_input_embeddings().weight.detach().clone()
    config = QuantConfig(embed_bits=8, head_bits=8, sensitivity_percent=0.0)
    record = quantize_embed_head(model, config, range_multiplier=None)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, SqueezeEmbedding) and embedding.bits == 8
    assert isinstance(head, TiedHead if tied else SqueezeLinear)
    assert record["head"]["tied"] is tied
    # 8-bit per-row tables on 576-wide rows: each row's values nearly exact
    assert relative_error(embedding(ids), embed_ref) < 0.01
    assert torch.equal(embedding(ids), embedding.dequantize()[ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert relative_error(logits, reference) < 0.02
    if tied:  # one stored table serves both: the head's logits are x @ table^T
        x = torch.randn(3, WIDE)
        assert torch.allclose(head(x), x @ embedding.dequantize().t(), atol=1e-4)
        assert sum(v.numel() for k, v in model.state_dict().items() if "lm_head" in k) == 0
    assert relative_error(embedding.dequantize(), weight) < 0.01


def save_tiny(tmp_path, tokenizer, tied: bool, config: QuantConfig, arch: str = "llama"):
    model = tiny_model(arch, tied=tied, vocab=len(tokenizer))
    run_to_end(quantize_model(model, config, None))
    folder = run_to_end(save_quantized(model, tokenizer, tmp_path / ("tied" if tied else "untied"), {
        "config": {"bits": config.bits}}))
    return model, folder


def stored_names(folder: Path) -> dict[str, tuple]:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_load_and_from_pretrained_round_trips(tmp_path, demo_tokenizer, tied):
    import core.interop  # noqa: F401  (registers the squeezellm method)
    from transformers import AutoModelForCausalLM

    config = QuantConfig(bits=4, embed_bits=6, head_bits=4, outliers=OutlierConfig(percent=0.45))
    model, folder = save_tiny(tmp_path, demo_tokenizer, tied, config)
    vocab = len(demo_tokenizer)
    names = stored_names(folder)
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert not any(n.startswith(("model.embed_tokens", "lm_head")) for n in block["modules"])
    assert block["embed_head"]["embedding"]["bits"] == 6
    if tied:  # stored once, at the larger width, under the embedding
        assert block["embed_head"]["head"] == {"name": "lm_head", "tied": True, "bias": False, "bias_dtype": None}
        assert not any(n.startswith("lm_head") for n in names)
    else:
        assert block["embed_head"]["head"]["bits"] == 4 and names["lm_head.qweight"] == ((HIDDEN // 32) * 4, vocab)
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        loaded = load_quantized(folder).model
        hf = AutoModelForCausalLM.from_pretrained(folder)
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(hf(ids).logits, expected)
    for m in (loaded, hf):
        dense = [n for n, t in list(m.named_parameters()) + list(m.named_buffers())
                 if t.is_floating_point() and tuple(t.shape) == (vocab, HIDDEN) and not n.endswith("lookup_table")]
        assert not dense, dense  # no dense copy of the embedding or head
        assert isinstance(m.get_output_embeddings(), TiedHead if tied else SqueezeLinear)
    if tied:
        assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()
    weights = dense_weights(loaded)  # what exporters write
    assert set(weights) == ({"model.embed_tokens.weight"} if tied else {"model.embed_tokens.weight", "lm_head.weight"})
    assert weights["model.embed_tokens.weight"].shape == (vocab, HIDDEN)


def test_five_bit_projections_and_table_round_trip(tmp_path, demo_tokenizer):
    """The widths that beat Q4_K_M in bench.llamacpp: 5-bit dense-only projections, a 5-bit tied table."""
    import core.interop  # noqa: F401  (registers the squeezellm method)
    from transformers import AutoModelForCausalLM

    config = QuantConfig(bits=5, embed_bits=5, head_bits=5, outliers=OutlierConfig(percent=None),
                         sensitivity_percent=0.0)
    model, folder = save_tiny(tmp_path, demo_tokenizer, True, config)
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert block["embed_head"]["embedding"]["bits"] == 5
    assert stored_names(folder)["model.embed_tokens.qweight"] == ((HIDDEN // 32) * 5, len(demo_tokenizer))
    assert {m.bits for m in model.modules() if isinstance(m, SqueezeLinear)} == {5}
    ids = torch.randint(0, len(demo_tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(load_quantized(folder).model(ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, expected)


def test_a_tied_model_stores_one_copy_and_sizes_match_the_bytes_on_disk(tmp_path, demo_tokenizer, capsys):
    from core.cli import main
    from core.evaluate import model_size_report
    from core.preview import collect_stats, embed_head_sizes, model_bytes, preview

    config = QuantConfig(bits=4, embed_bits=4, head_bits=6, outliers=OutlierConfig(percent=None), sensitivity_percent=0)
    original = tiny_model(tied=True, vocab=len(demo_tokenizer))
    sizes = embed_head_sizes(original)
    model, folder = save_tiny(tmp_path, demo_tokenizer, True, config)
    vocab = len(demo_tokenizer)
    names = stored_names(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        nbytes = {n: handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names}
    pair = sorted(n for n in names if n.startswith(("model.embed_tokens", "lm_head")))
    assert pair == [f"model.embed_tokens.{part}" for part in  # one copy, at the larger width (6 bits)
                    ("lookup_table", "qweight", "sparse_cols", "sparse_rows", "sparse_vals")]
    assert names["model.embed_tokens.lookup_table"] == (vocab, 64)
    pair_on_disk = sum(b for n, b in nbytes.items() if n.startswith("model.embed_tokens"))
    assert pair_on_disk == sizes.folder_bytes(config)  # the Inspect page's estimate
    assert pair_on_disk == vocab * (HIDDEN * 6 // 8 + 64 * 2) + (vocab + 1) * 4  # codes + fp16 LUT + CSR pointer
    report = model_size_report(load_quantized(folder).model)  # the eval table's size
    assert report.total_bytes == sum(nbytes.values())
    q_bytes, o_bytes = model_bytes(original)  # squeeze inspect's "model" size, before quantizing
    predicted = preview(run_to_end(collect_stats(original)), config, o_bytes, q_bytes + o_bytes, sizes)
    # dense-only: codes, tables and CSR pointers are predicted exactly; buffers (rotary tables) may differ
    assert abs(predicted.total_bytes - report.total_bytes) <= 1e-3 * report.total_bytes
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert 0 < file_bytes - report.total_bytes < 64 * 1024  # only the safetensors header besides
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "embedding, head: 6-bit LUT, tied (stored once)" in out


def test_narrow_rows_keep_float16_where_codes_would_be_larger(demo_tokenizer):
    from core.embed_head import quantized_modules, stored_bits
    from core.preview import embed_head_sizes

    assert stored_bits(6, 6, True, 64) == (16, 16)  # 48 bytes of codes + 128 of LUT against 128
    assert stored_bits(6, 4, False, 64) == (16, 4)
    assert stored_bits(6, 6, True, 128) == (6, 6)
    assert stored_bits(8, 8, False, 512) == (16, 16) and stored_bits(8, 8, False, 544) == (8, 8)
    model = tiny_model(tied=True, vocab=len(demo_tokenizer), hidden=64)
    config = QuantConfig()  # the default 6-bit embedding and head
    assert quantized_modules(model, config) == {}
    sizes = embed_head_sizes(model)
    assert sizes.folder_bytes(config) == len(demo_tokenizer) * 64 * 2  # float16, never larger


def test_bad_widths_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="embed bits = 7 is not supported: use 4, 5, 6 or 8"):
        QuantConfig(embed_bits=7)
    with pytest.raises(ValueError, match="head bits = 3"):
        QuantConfig(head_bits=3)
    with pytest.raises(ValueError, match="embedding weighting 'often'"):
        QuantConfig(embed_weighting="often")
    result = subprocess.run([sys.executable, "-m", "core.cli", "quantize", "demo", "-o", str(tmp_path / "o"),
                             "--embed-bits", "7"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "squeeze: error: --embed-bits 7 is not supported: use 4, 5, 6 or 8 (lookup-table codes) or 16 (float16)"]


def tiny_gemma3(vocab=256):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=WIDE, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=128, sliding_window=16)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_gemma3_scaled_embedding_keeps_its_scale(tmp_path, demo_tokenizer):
    model = tiny_gemma3(1024)
    original = model.get_input_embeddings()
    assert type(original).__name__ == "Gemma3TextScaledWordEmbedding" and float(original.embed_scale) == 24.0
    ids = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rows = original(ids)
        logits = model(ids).logits
    assert find_embed_head(model).tied
    quantize_embed_head(model, QuantConfig(embed_bits=8, head_bits=8, sensitivity_percent=0))
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, SqueezeEmbedding) and embedding.scale == pytest.approx(24.0)
    assert float(embedding.embed_scale) == 24.0  # the module's attribute is still there
    assert relative_error(embedding(ids), rows) < 0.01  # scaled like the original, not 24x off
    with torch.no_grad():
        assert relative_error(model(ids).logits, logits) < 0.05
    folder = run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "gemma", {"config": {"bits": 4}}))
    loaded = load_quantized(folder).model
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.get_input_embeddings().scale == pytest.approx(24.0)


# ------------------------------------------------------------------ the streaming engine


@pytest.fixture
def no_fisher_cache(monkeypatch):
    monkeypatch.setenv("SQUEEZE_FISHER_CACHE_GB", "0")


def tiny_folder(tmp_path, tokenizer, tied: bool) -> Path:
    model = tiny_model(tied=tied, vocab=len(tokenizer))
    folder = tmp_path / ("src-tied" if tied else "src-untied")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_streamed_head_fisher_equals_the_whole_model_pass(tmp_path, demo_tokenizer):
    from core.activation_store import ActivationStore
    from core.block_pass import BlockMajorPass
    from core.lazy_model import LazyModel
    from core.sensitivity import compute_fisher, head_target

    folder = tiny_folder(tmp_path, demo_tokenizer, tied=False)
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    from core.models import load_model

    model = load_model(str(folder)).model
    whole = run_to_end(compute_fisher(model, windows, head_target(model)))["lm_head"]
    lazy = LazyModel.open(folder)
    passer = BlockMajorPass(lazy, windows, torch.device("cpu"), ActivationStore(1 << 30, tmp_path / "spill"))
    passer.prepare()
    run_to_end(passer.forward_sweep(len(lazy.blocks)))
    run_to_end(passer.top_gradients(head_fisher=True))
    assert relative_error(passer.head_fisher, whole) < 1e-5
    assert not lazy.skeleton.lm_head.weight.requires_grad


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_streaming_quantizes_embedding_and_head_into_a_folder_that_loads(tmp_path, demo_tokenizer, no_fisher_cache,
                                                                         tied):
    from core.pipeline import QuantizeJob, run_quantize_job

    folder = tiny_folder(tmp_path, demo_tokenizer, tied)
    config = QuantConfig(bits=4, embed_bits=6, head_bits=4)
    job = QuantizeJob(model=str(folder), output=tmp_path / "q", config=config,
                      calibration=CalibrationConfig(samples=3, seqlen=64), device="cpu")
    run_to_end(run_quantize_job(job))
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    record = block["embed_head"]
    assert record["embedding"]["bits"] == 6 and record["embedding"]["nnz"] > 0  # dense-and-sparse like the rest
    assert record["head"]["tied"] is tied and (tied or record["head"]["bits"] == 4)
    assert not (tmp_path / "q" / "head-fisher.safetensors").exists()
    names = stored_names(tmp_path / "q")
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    from core.models import load_model

    original = load_model(str(folder)).model
    quantized = load_quantized(tmp_path / "q").model
    ids = torch.randint(0, len(demo_tokenizer), (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(quantized(ids).logits, original(ids).logits) < 0.2  # measured 0.13 (tied), 4 + 6 bits
