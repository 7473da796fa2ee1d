"""Exports of a quantized folder: the original's packed .pt (vLLM), a dense HF folder, a GGUF file."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from core.checkpoint import load_quantized, save_quantized
from core.config import OutlierConfig, QuantConfig
from core.errors import UserError
from core.interop.export import export_model, vllm_export_problem
from core.interop.gguf_export import permute_for_rotary, pre_tokenizer_name
from core.interop.original_pt import import_original_checkpoint
from core.layers import SqueezeLinear
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import build_tiny_model

# what vLLM's SqueezeLLM loader reads: 4-bit dense-only, the embedding and head in float16
DENSE_ONLY_4BIT = QuantConfig(bits=4, outliers=OutlierConfig(percent=None), sensitivity_percent=0.0, embed_bits=16,
                              head_bits=16)
SPARSE_3BIT = QuantConfig(bits=3, sensitivity_percent=1.0)  # 64-wide rows: the embedding and head stay float16


def quantized_folder(path, tokenizer, config, arch="llama"):
    model = build_tiny_model(arch)
    run_to_end(quantize_model(model, config, None))
    return run_to_end(save_quantized(model, tokenizer, path, {"config": {"bits": config.bits}}))


def _sentencepiece_style_tokenizer():
    """A small LLaMA-2-style tokenizer.json (BPE with byte fallback, "▁" for spaces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    text = ["the quick brown fox jumps over the lazy dog", "hello world, numbers 12345 and words"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def small_vocab_folder(path, arch="llama", config=DENSE_ONLY_4BIT):
    """A quantized tiny model with a 512-token vocabulary and a sentencepiece-style tokenizer
    (fast to write and read back as GGUF)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=512)).eval()
    run_to_end(quantize_model(model, config, None))
    return run_to_end(save_quantized(model, _sentencepiece_style_tokenizer(), path, {}))


@pytest.fixture(scope="module")
def dense_only(tmp_path_factory, demo_tokenizer):
    return quantized_folder(tmp_path_factory.mktemp("q") / "q4", demo_tokenizer, DENSE_ONLY_4BIT)


@pytest.fixture(scope="module")
def sparse_3bit(tmp_path_factory, demo_tokenizer):
    return quantized_folder(tmp_path_factory.mktemp("q") / "q3", demo_tokenizer, SPARSE_3BIT)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- squeezellm-pt


def test_squeezellm_pt_has_the_original_layout_and_imports_back(tmp_path, dense_only):
    out = run_to_end(export_model(dense_only, "squeezellm-pt", tmp_path / "vllm", dtype=torch.float32))
    assert json.loads((out / "quant_config.json").read_text()) == {"wbits": 4}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    state = torch.load(out / "model.pt", weights_only=True)
    quantized = load_quantized(dense_only)
    for name, layer in quantized.model.named_modules():
        if isinstance(layer, SqueezeLinear):
            assert state[f"{name}.qweight"].dtype == torch.int32
            assert tuple(state[f"{name}.qweight"].shape) == (layer.in_features // 8, layer.out_features)
            assert state[f"{name}.lookup_table"].dtype == torch.float32
            assert torch.equal(state[f"{name}.lookup_table"], layer.lookup_table.float())
    assert not any(k.endswith(("sparse_rows", "sparse_cols", "sparse_vals")) or "sparse_threshold" in k for k in state)
    assert "model.embed_tokens.weight" in state and "model.norm.weight" in state
    back = run_to_end(import_original_checkpoint(out / "model.pt", None, tmp_path / "back"))
    torch.testing.assert_close(_logits(load_quantized(back).model, IDS), _logits(quantized.model, IDS),
                               rtol=1e-5, atol=1e-5)


def test_squeezellm_pt_default_dtype_is_float16(tmp_path, dense_only):
    events = []
    out = run_to_end(export_model(dense_only, "squeezellm-pt", tmp_path / "vllm"), events.append)
    # 64x160 layers are not whole 128-blocks: vLLM's kernel would read out of bounds, so say so
    assert any(e.stage == "warning" and "128" in e.message for e in events)
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["model.embed_tokens.weight"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_squeezellm_pt_refuses_what_vllm_cannot_load(tmp_path, sparse_3bit, dense_only):
    with pytest.raises(UserError, match="3-bit") as info:
        run_to_end(export_model(sparse_3bit, "squeezellm-pt", tmp_path / "vllm"))
    # every setting vLLM needs
    assert "--bits 4 --outlier-percent 0 --sensitivity 0 --embed-bits 16 --head-bits 16" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    model = load_quantized(dense_only).model
    assert vllm_export_problem(model) is None
    coded = build_tiny_model()
    run_to_end(quantize_model(coded, dataclasses.replace(DENSE_ONLY_4BIT, embed_bits=4, head_bits=4), None))
    assert "lookup-table codes" in vllm_export_problem(coded)
    layer = model.model.layers[0].mlp.down_proj
    layer.sparse_vals = torch.ones(1)
    assert "sparse" in vllm_export_problem(model)
    odd = SqueezeLinear(40, 64, 4)
    model.model.layers[0].mlp.down_proj = odd
    assert "multiple of 32" in vllm_export_problem(model)


def test_unknown_format_and_dtype_are_refused(tmp_path, dense_only):
    with pytest.raises(UserError, match="unknown export format"):
        run_to_end(export_model(dense_only, "onnx", tmp_path / "x"))
    with pytest.raises(UserError, match="float16 or float32"):
        run_to_end(export_model(dense_only, "gguf", tmp_path / "x.gguf", dtype=torch.bfloat16))
    with pytest.raises(UserError, match=r"\.gguf"):
        run_to_end(export_model(dense_only, "gguf", tmp_path / "x.bin"))


def test_cancelled_export_leaves_nothing(tmp_path, sparse_3bit):
    for fmt, target in (("hf-dense", tmp_path / "dense"), ("gguf", tmp_path / "x.gguf")):
        gen = export_model(sparse_3bit, fmt, target, dtype=torch.float32)
        for _ in range(4):
            next(gen)
        gen.close()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- hf-dense


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-2)])
def test_hf_dense_loads_anywhere_and_matches(tmp_path, sparse_3bit, dtype, tol):
    from transformers import AutoModelForCausalLM

    out = run_to_end(export_model(sparse_3bit, "hf-dense", tmp_path / "dense", dtype=dtype))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and (out / "tokenizer.json").is_file()
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert not any(isinstance(m, SqueezeLinear) for m in dense.modules())
    assert dense.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    quantized = load_quantized(sparse_3bit).model
    torch.testing.assert_close(dense.model.layers[1].mlp.up_proj.weight.float(),
                               quantized.model.layers[1].mlp.up_proj.dequantize().to(dtype).float())
    torch.testing.assert_close(_logits(dense.float(), IDS), _logits(quantized, IDS), rtol=tol, atol=tol)


# ---------------------------------------------------------------- gguf


def test_gguf_reads_back_with_the_tokenizer(tmp_path, sparse_3bit, demo_tokenizer):
    import gguf
    from transformers import AutoTokenizer

    out = run_to_end(export_model(sparse_3bit, "gguf", tmp_path / "gguf" / "tiny-f32.gguf", dtype=torch.float32))
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre", "token_id"))}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 64 and fields["llama.feed_forward_length"] == 160
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    # llama.cpp's name for SmolLM2's pre-tokenizer, found by the tokenizer's hash as llama.cpp's converter does
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert "tokenizer.chat_template" in reader.fields
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 + 2 * 9 and "output.weight" not in names  # tied embeddings
    quantized = load_quantized(sparse_3bit).model
    q_proj = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    expected = permute_for_rotary(quantized.model.layers[0].self_attn.q_proj.dequantize(), 4)
    assert np.array_equal(np.asarray(q_proj.data), expected.numpy())

    # transformers loading the weights is checked with a small vocabulary below (it is slow for 49k tokens)
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "<|im_start|>user\nHello world, 1234 tokens!<|im_end|>"
    assert tokenizer(text)["input_ids"] == demo_tokenizer(text)["input_ids"]


def test_gguf_float16_and_untied_mistral(tmp_path):
    import gguf

    folder = small_vocab_folder(tmp_path / "m", "mistral")
    config = json.loads((folder / "config.json").read_text())
    out = run_to_end(export_model(folder, "gguf", tmp_path / "m-f16.gguf"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert ("output.weight" in types) != bool(config.get("tie_word_embeddings"))


def test_gguf_refuses_other_architectures(tmp_path):
    folder = small_vocab_folder(tmp_path / "o", "opt")
    with pytest.raises(UserError, match="LLaMA-family"):
        run_to_end(export_model(folder, "gguf", tmp_path / "o.gguf"))
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".*partial"))


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"  # llama.cpp refuses "gpt2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name(digits) == "smollm"
    assert pre_tokenizer_name({"type": "Whitespace"}) == "default"


def test_gguf_sentencepiece_style_tokenizer_and_weights_load_in_transformers(tmp_path):
    """LLaMA / Vicuna / Mistral vocabularies are written as llama.cpp's "llama" tokenizer model, and
    transformers (which undoes the q/k permutation) gives the quantized model's logits."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = small_vocab_folder(tmp_path / "q")
    tokenizer = load_quantized(folder).tokenizer
    out = run_to_end(export_model(folder, "gguf", tmp_path / "g" / "spm.gguf", dtype=torch.float32))
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[3 + 0x41] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    assert types[450] == gguf.TokenType.UNUSED  # padded up to the embedding size
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in ["hello world, quick fox!", "the lazy dog jumps 123 times", "ünïcode €"]:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 10))
    torch.testing.assert_close(_logits(loaded, ids), _logits(load_quantized(folder).model, ids), rtol=1e-4, atol=1e-4)
