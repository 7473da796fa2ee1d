"""GGUF export of the dequantized weights (LLaMA-family models), for llama.cpp, LM Studio, Ollama.

Written with the ``gguf`` package's ``GGUFWriter`` in streaming mode: tensor infos first, then
one tensor at a time, so only one dequantized matrix is in memory at once. The layout follows
llama.cpp's converter for ``LlamaForCausalLM`` / ``MistralForCausalLM``: architecture ``llama``,
the ``llama.*`` hyper-parameters, tensor names from ``gguf.get_tensor_name_map``, 2-D weights in
float16 (or float32), 1-D tensors in float32, no ``output.weight`` when the embeddings are tied,
and q_proj/k_proj rows permuted into llama.cpp's rotary layout: reshape the rows to
``[heads, 2, head_dim/2]``, swap the two inner axes (HF's "first half / second half" of each
head becomes interleaved pairs), using the KV head count for k_proj. Readers undo it on load.
Tokenizer (token list, types, BPE merges or scores, special ids) and chat template come along: copied
from the GGUF file the model was quantized from when there is one, else derived from tokenizer.json
with llama.cpp's name for the pre-tokenizer (``tokenizer.ggml.pre``; llama.cpp refuses names it
does not know).
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.litter import sweep, temp_path
from core.outputs import check_output_path
from core.progress import ProgressEvent

GGUF_MODEL_TYPES = ("llama", "mistral")
# A few pre-tokenizers llama.cpp knows, recognised from tokenizer.json (gpt2-style vocabularies).
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
                 "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def check_gguf_output(output: Path, dtype: torch.dtype, overwrite: bool) -> None:
    """UserError before any work when ``output`` or ``dtype`` cannot be written."""
    if dtype not in (torch.float16, torch.float32):
        raise UserError(f"GGUF export writes float16 or float32 tensors, not {dtype}: choose one of those")
    if output.suffix.lower() != ".gguf":
        raise UserError(f"{output} does not end in .gguf: name the output file like model-f16.gguf")
    check_output_path(output, overwrite=overwrite, kind="file")


def permute_for_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows [heads*head_dim, ...] from HF's half-split rotary layout to llama.cpp's interleaved one."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_gguf(loaded, folder: Path, output: Path, dtype: torch.dtype) -> Generator[ProgressEvent, None, Path]:
    """Write ``loaded`` (a quantized LoadedModel from ``folder``) as one GGUF file at ``output``."""
    import gguf

    config = loaded.model.config
    _check_supported(config)
    tensors = _tensor_plan(loaded.model, config, dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep(output.parent)  # files a killed export left behind
    tmp = temp_path(output)  # names this process: two exports to one name never share it
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _add_hyperparameters(writer, config, loaded.name, dtype)
        add_tokenizer(writer, loaded.tokenizer, folder, config.vocab_size)
        for name, (shape, np_dtype, _) in tensors.items():
            writer.add_tensor_info(name, shape, np_dtype, int(np.prod(shape)) * np_dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (name, (_, np_dtype, produce)) in enumerate(tensors.items()):
            writer.write_tensor_data(produce().numpy().astype(np_dtype, copy=False))
            yield ProgressEvent("gguf", i + 1, len(tensors), f"wrote {name}")
        writer.close()
        os.replace(tmp, output)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return output


def _check_supported(config) -> None:
    if config.model_type not in GGUF_MODEL_TYPES:
        raise UserError(f"GGUF export supports LLaMA-family models (llama, mistral), not {config.model_type!r}: "
                        "export hf-dense and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise UserError(f"GGUF export does not write {rope.get('rope_type')!r} rope scaling: export hf-dense "
                        "and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def _rope_parameters(config) -> dict:
    """Rope settings across transformers versions (5.x: ``rope_parameters``; 4.x: ``rope_theta`` +
    ``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer, config, name: str, dtype: torch.dtype) -> None:
    import gguf

    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)


def _tensor_plan(model, config, dtype: torch.dtype) -> dict:
    """GGUF name -> (numpy shape, numpy dtype, producer of the float32 CPU tensor), in file order."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    plan = {}
    for key, tensor in model.state_dict().items():
        module_name, _, part = key.rpartition(".")
        module = modules.get(module_name)
        quantized = callable(getattr(module, "layout", None))
        if quantized and part != "qweight" and part != "bias":
            continue  # the layer is written once, as its dequantized weight
        hf_name = f"{module_name}.weight" if quantized and part == "qweight" else key
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{hf_name} has no GGUF name for a llama model: this model is not a plain "
                            "LLaMA/Mistral; export hf-dense instead")
        produce = _producer(module, tensor, quantized and part == "qweight",
                            heads.get(module_name.rpartition(".")[2]))
        rows = (module.out_features, module.in_features) if quantized and part == "qweight" else tuple(tensor.shape)
        np_dtype = np.dtype(np.float16 if dtype == torch.float16 and len(rows) == 2 else np.float32)
        plan[gguf_name] = (rows, np_dtype, produce)
    return plan


def _producer(module, tensor: torch.Tensor, dequantize: bool, heads: int | None):
    def produce() -> torch.Tensor:
        with torch.no_grad():
            value = module.dequantize() if dequantize else tensor.detach()
            value = value.to(device="cpu", dtype=torch.float32)
            return permute_for_rotary(value, heads).contiguous() if heads else value.contiguous()
    return produce


# ---------------------------------------------------------------- tokenizer


def add_tokenizer(writer, tokenizer, folder: Path, vocab_size: int) -> None:
    """Token list and types (padded to the embedding's ``vocab_size``), BPE merges or scores,
    special token ids, add-bos/eos flags and the chat template.

    When the folder was quantized from a GGUF file that is still there and has the same token list,
    its ``tokenizer.*`` metadata is copied as it is (llama.cpp's converter wrote it); otherwise it is
    derived from the folder's tokenizer.json."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer.json").is_file() else None
    if spec is None or spec.get("model", {}).get("type") != "BPE":
        raise UserError(f"{folder} has no BPE tokenizer.json: GGUF export needs the fast tokenizer file; "
                        "save the tokenizer with transformers into the folder, or export hf-dense")
    sentencepiece_style = not _byte_level(spec)
    tokens, types = _token_table(tokenizer, vocab_size, sentencepiece_style)
    source = source_gguf(folder)
    if source is not None and copy_tokenizer_metadata(writer, source, tokens):
        return
    writer.add_tokenizer_model("llama" if sentencepiece_style else "gpt2")
    if not sentencepiece_style:
        writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(tokenizer, spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if sentencepiece_style:  # llama.cpp merges sentencepiece pairs by score: best merge first
        writer.add_token_scores(merge_scores(tokens, types, special.merges))
    special.add_to_gguf(writer, quiet=True)


def source_gguf(folder: Path) -> Path | None:
    """The GGUF file the quantized ``folder`` was made from, when its config names one that exists
    (``source_model``: "demo" or a path ending in .gguf)."""
    from core.models import demo_gguf_path

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    source = str((config.get("quantization_config") or {}).get("source_model") or "").strip()
    if source == "demo":
        try:
            return demo_gguf_path()
        except UserError:
            return None
    path = Path(source).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def copy_tokenizer_metadata(writer, source: Path, tokens: list[str]) -> bool:
    """Copy every ``tokenizer.*`` key of GGUF ``source`` into ``writer`` when its token list is
    ``tokens``; False (nothing written) when it is not (another vocabulary, or padded differently)."""
    import gguf

    reader = gguf.GGUFReader(source)
    fields = {key: field for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    listed = fields.get("tokenizer.ggml.tokens")
    if listed is None or len(listed.data) != len(tokens) or listed.contents() != tokens:
        return False
    for key, field in fields.items():
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    return True


def _byte_level(spec: dict) -> bool:
    """True for GPT-2-style byte-level BPE (a ByteLevel pre-tokenizer or decoder); otherwise the
    vocabulary is sentencepiece-style ("\u2581" for spaces, byte-fallback tokens)."""
    def kinds(step: dict | None) -> list[str]:
        step = step or {}
        inner = step.get("pretokenizers") or step.get("decoders") or []
        return [step.get("type")] + [kind for child in inner for kind in kinds(child)]

    return "ByteLevel" in kinds(spec.get("pre_tokenizer")) + kinds(spec.get("decoder"))


def _token_table(tokenizer, vocab_size: int, sentencepiece_style: bool) -> tuple[list[str], list[int]]:
    """(tokens, GGUF token types) for ids 0..vocab_size-1; ids the tokenizer lacks become unused
    "[PAD<i>]" entries, added tokens are control (special) or user-defined tokens."""
    import gguf

    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model embeds only "
                        f"{vocab_size} tokens: the folder's tokenizer does not belong to this model")
    by_id = {i: text for text, i in vocab.items()}
    added = dict(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        tokens.append(text if text is not None else f"[PAD{i}]")
        if text is None:
            types.append(gguf.TokenType.UNUSED)
        elif sentencepiece_style and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)  # byte-fallback pieces, whether listed as added or not
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merge_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """Sentencepiece-style scores: a token made by merge number r scores -r (earlier merges win);
    other normal tokens score below every merge, special and byte tokens 0."""
    import gguf

    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    floor = -float(len(merges))
    return [-float(rank[t]) if t in rank else (floor - i if kind == gguf.TokenType.NORMAL else 0.0)
            for i, (t, kind) in enumerate(zip(tokens, types))]


def llama_cpp_pre_tokenizer(tokenizer, pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a gpt2-style tokenizer: by the hash of its tokens for
    a fixed text, as llama.cpp's converter decides (core.interop.gguf_pre_tokenizers), else from the
    tokenizer.json ``pre_tokenizer`` steps (``pre_tokenizer_name``)."""
    from hashlib import sha256

    from core.interop.gguf_pre_tokenizers import CHECK_TEXT, PRE_TOKENIZER_BY_HASH

    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return PRE_TOKENIZER_BY_HASH.get(digest) or pre_tokenizer_name(pre)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a gpt2-style pre-tokenizer described in tokenizer.json ("default" when
    it is not one of the few recognised here: llama.cpp then applies its generic split rules, which
    may tokenize some text differently from the model's own tokenizer)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    return "default"
