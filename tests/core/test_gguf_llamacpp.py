"""The GGUF export loads and evaluates in llama.cpp itself (the program it is for), not only in gguf-py
and transformers: llama.cpp refused the earlier export ("unknown pre-tokenizer type: 'gpt2'").

llama.cpp's tools are built once from llama-cpp-python's sdist into the cache (bench.llamacpp_tools;
``bash scripts/dev.sh test`` builds them before the suite, a few minutes the first time).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.llamacpp import second_half_perplexity
from bench.llamacpp_tools import ensure_tools, perplexity, token_ids
from core.checkpoint import load_quantized, save_quantized
from core.config import QuantConfig
from core.data import corpus_tokens
from core.interop.export import export_model
from core.models import demo_gguf_path
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import tiny_config

CTX = 128
CHUNKS = 4


@pytest.fixture(scope="module")
def llamacpp():
    return ensure_tools()


def _peaked_tiny_folder(path, tokenizer, settings, embed_bits=16):
    """A 3-bit dense-and-sparse tiny LLaMA with the demo vocabulary, its tied embedding and head at
    ``embed_bits``, and weights large enough that its predictions are far from uniform and depend on
    the context (with the usual 0.02 init every model scores ~49,152, and a wrong rotary layout
    would go unnoticed)."""
    from transformers import AutoModelForCausalLM

    # 128-wide rows where the table gets codes: at 64 a 6-bit table would stay float16 (core.embed_head.stored_bits)
    model_config = tiny_config("llama", hidden_size=64 if embed_bits == 16 else 128)
    model_config.initializer_range = 0.25
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).eval()
    config = QuantConfig(bits=3, sensitivity_percent=1.0, embed_bits=embed_bits, head_bits=embed_bits)
    run_to_end(quantize_model(model, config, None))
    return run_to_end(save_quantized(model, tokenizer, path, settings, half_embeddings=False))


@pytest.mark.parametrize("source,dtype,tolerance,embed_bits", [
    ("demo", torch.float16, 1e-2, 16), (None, torch.float32, 2e-3, 16), ("demo", torch.float32, 2e-3, 6)],
    ids=["from-the-demo-gguf-f16", "no-source-file-f32", "6-bit-embedding-f32"])
def test_exported_gguf_evaluates_in_llamacpp_like_our_evaluator(tmp_path, llamacpp, demo_tokenizer, source, dtype,
                                                                tolerance, embed_bits):
    import gguf

    folder = _peaked_tiny_folder(tmp_path / "q3", demo_tokenizer, {"source_model": source} if source else {},
                                 embed_bits)
    out = run_to_end(export_model(folder, "gguf", tmp_path / "tiny.gguf", dtype=dtype))
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied, or found by the tokenizer's hash
    if source == "demo":  # the source file's metadata travels as it is
        original = gguf.GGUFReader(demo_gguf_path()).fields
        for key in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
            assert fields[key].contents() == original[key].contents()

    ids = corpus_tokens(demo_tokenizer, "builtin")[: CTX * CHUNKS + 32]
    text = demo_tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False)
    text_file = tmp_path / "eval.txt"
    text_file.write_text(text, encoding="utf-8")
    assert token_ids(out, text_file, llamacpp)[: CTX * CHUNKS] == ids[: CTX * CHUNKS].tolist()

    theirs, chunks = perplexity(out, text_file, CTX, chunks=CHUNKS, home=llamacpp)
    assert chunks == CHUNKS and math.isfinite(theirs)
    ours = second_half_perplexity(load_quantized(folder).model, ids[: CTX * CHUNKS].reshape(CHUNKS, CTX))
    # far from a uniform guess over 49,152 tokens (what a model with the usual small init scores): the
    # predictions depend on the weights and the context, so the comparison below has teeth
    assert abs(math.log(ours / 49152)) > 1
    assert theirs == pytest.approx(ours, rel=tolerance), (theirs, ours)

