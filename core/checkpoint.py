"""Quantized model folders: save atomically, load without materialising dense weights.

A folder holds ``config.json`` (the model's config plus a ``quantization_config``
block: method, bits, sparsity settings, per-module layout with each module's bits, format
version, and ``bits_overrides`` (name -> bits of the modules whose width differs from the
config's, present only for mixed precision; readers of format 1 that ignore it still load
each module at its own width from the layout)), the
tokenizer files, and ``model.safetensors`` with the packed tensors of every quantized
module (``<name>.qweight``, ``.lookup_table``, ``.sparse_rows/cols/vals``, ``.bias``)
and every other tensor of the model as it was. A quantized token embedding and output head
(``core.embed_head``) are described apart from the projections, under ``embed_head``, their tensors
named after their modules (``model.embed_tokens.table.qweight``, ``lm_head.qweight``; a tied pair
once, under the embedding).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path

import torch

from core.errors import UserError
from core.embed_head import RECORD_KEY as EMBED_HEAD
from core.embed_head import empty_modules as empty_embed_head
from core.embed_head import install as install_embed_head
from core.embed_head import record as embed_head_record
from core.half_head import halve_embeddings
from core.layers import SqueezeLinear
from core.progress import ProgressEvent
from core.shared_input import link_shared_inputs

QUANT_METHOD = "squeezellm"
# quantization_config key saying the token embedding (and a tied or untied head) is stored in float16.
EMBEDDINGS_DTYPE = "embeddings_dtype"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def module_layout(model: torch.nn.Module) -> dict[str, dict]:
    """name -> how to rebuild each quantized module (type and sizes), in module order."""
    layout = {}
    for name, module in model.named_modules():
        describe = getattr(module, "layout", None)
        if callable(describe):
            layout[name] = describe()
    return layout


def bits_overrides(layout: dict[str, dict], default_bits) -> dict[str, int]:
    """name -> bits of every quantized module whose width differs from ``default_bits`` (mixed precision).

    Empty when every module has the default width (or no default is known), so folders of a single
    width look exactly as before.
    """
    if not isinstance(default_bits, int) or isinstance(default_bits, bool):
        return {}  # none known (an imported checkpoint lists its widths instead)
    return {name: int(info["bits"]) for name, info in layout.items()
            if "bits" in info and int(info["bits"]) != int(default_bits)}


def layer_bits(block: dict) -> dict[str, int]:
    """name -> bits of every quantized module of a ``quantization_config`` block.

    The per-module layout is authoritative; ``bits_overrides`` and then the config's bits fill in
    for a layout entry that does not say (hand-written or older folders).
    """
    default = (block.get("config") or {}).get("bits")
    default = default if isinstance(default, int) else None  # an imported checkpoint may list several
    overrides = block.get("bits_overrides") or {}
    result = {}
    for name, info in (block.get("modules") or {}).items():
        bits = info.get("bits", overrides.get(name, default))
        if bits is None:
            raise UserError(f"quantized module {name!r} does not say its bit width in config.json: "
                            "the folder is incomplete; quantize the model again")
        result[name] = int(bits)
    return result


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``save_quantized``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        block = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return block.get("quant_method") == QUANT_METHOD


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases (tied embeddings), contiguous and on the CPU."""
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -id(tensor)
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor.detach().cpu().contiguous()
    return state


def save_quantized(model: torch.nn.Module, tokenizer, output: str | os.PathLike, settings: dict, *,
                   overwrite: bool = False, half_embeddings: bool = True) -> Generator[ProgressEvent, None, Path]:
    """Write a quantized model folder; nothing appears at ``output`` until it is complete.

    settings: JSON-ready quantization settings (QuantConfig dict, calibration, report numbers).
    half_embeddings: switch a float32 model's token embedding and output head to float16 storage
    in place first (core.half_head), so the model in memory is the one saved; False keeps them as
    they are (an import must reproduce its source exactly).
    """
    from safetensors.torch import save_file

    from core.litter import sweep, temp_path

    output = Path(output).expanduser().resolve()
    _check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep(output.parent)  # what killed saves left behind
    tmp = temp_path(output)  # made with mkdir: the user's normal permissions (mkdtemp's are 0700)
    tmp.mkdir()
    try:
        yield ProgressEvent("save", 0, 3, "saving: tensors")
        halved = half_embeddings and halve_embeddings(model)
        save_file(_unique_state(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        yield ProgressEvent("save", 1, 3, "saving: config and tokenizer")
        config = model.config.to_dict()
        embed_head = embed_head_record(model)
        layout = {name: info for name, info in module_layout(model).items()
                  if not _inside_embed_head(name, embed_head)}
        overrides = bits_overrides(layout, (settings.get("config") or {}).get("bits"))
        config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                         **settings, **({"bits_overrides": overrides} if overrides else {}),
                                         "modules": layout}
        if halved:
            config["quantization_config"][EMBEDDINGS_DTYPE] = "float16"
        if embed_head:
            config["quantization_config"][EMBED_HEAD] = embed_head
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        yield ProgressEvent("save", 2, 3, "saving: moving into place")
        _move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    yield ProgressEvent("save", 3, 3, f"saved {output}")
    return output


def _inside_embed_head(name: str, embed_head: dict | None) -> bool:
    """True for a module of the quantized embedding or head (described under ``embed_head``, not ``modules``)."""
    if not embed_head:
        return False
    roots = [part["name"] for part in embed_head.values()]
    return any(name == root or name.startswith(root + ".") for root in roots)


def _check_output(output: Path, overwrite: bool) -> None:
    """UserError unless ``output`` can be written as a model folder (core.outputs.check_output_path)."""
    from core.outputs import check_output_path

    check_output_path(output, overwrite=overwrite, kind="folder")


def _move_into_place(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_quantization_config(folder: str | os.PathLike) -> dict:
    """The ``quantization_config`` block of a quantized folder (UserError if it is not one)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: give a folder written by 'squeeze quantize'")
    try:
        block = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except ValueError as exc:
        raise UserError(f"{folder}/config.json is not valid JSON ({exc}): re-run 'squeeze quantize'") from exc
    if block.get("quant_method") != QUANT_METHOD:
        raise UserError(f"{folder} is not a SqueezeLLM quantized folder: quantize it with 'squeeze quantize'")
    if int(block.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{folder} was written by a newer Squeeze Studio (format "
                        f"{block.get('format_version')}): upgrade squeeze-studio to load it")
    return block


def build_quantized_module(info: dict) -> torch.nn.Module:
    """An empty module (meta tensors) of the type and sizes ``info`` (from ``layout()``) describes."""
    kind = info.get("type", "squeeze")
    try:
        if kind == "squeeze":
            return SqueezeLinear.from_layout(info)
        if kind == "group":
            from core.baselines import GroupQuantLinear

            return GroupQuantLinear.from_layout(info)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. 5 bits, a size missing: an edited config.json
        raise UserError(f"config.json describes a quantized layer that cannot exist ({info}: {exc}): the folder "
                        "is corrupt or was edited; quantize the model again") from exc
    raise UserError(f"unknown quantized layer type {kind!r}: upgrade squeeze-studio to load this folder")


def read_weights(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a quantized folder (one file or shards). UserError for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from core.folder_check import weight_files

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            state.update(load_file(path, device=device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path} is missing or corrupt ({exc}): quantize the model again") from exc
    return state


def load_quantized(folder: str | os.PathLike, *, device: str = "cpu"):
    """Load a quantized folder as a working transformers model with quantized modules.

    Dense weights of the quantized layers are never materialised. Returns core.models.LoadedModel.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from core.models import LoadedModel

    folder = Path(folder).expanduser()
    block = read_quantization_config(folder)
    state = read_weights(folder, device)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    half_embeddings = block.get(EMBEDDINGS_DTYPE) == "float16"  # then the model computes in float32
    embed_head = block.get(EMBED_HEAD)  # a quantized embedding / head: the model computes in float32 too
    dtype = torch.float32 if half_embeddings or embed_head else next(
        (t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight")), torch.float32)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    widths = layer_bits(block)
    for name, info in block.get("modules", {}).items():
        model.set_submodule(name, build_quantized_module({**info, "bits": widths[name]}))
    if embed_head:
        install_embed_head(model, empty_embed_head(model, embed_head, dtype))
    from core.folder_check import check_shapes

    check_shapes(folder, model)  # one line naming the first mismatch, not load_state_dict's hundreds
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a quantized tied pair is tied by its modules (core.embed_head.install)
    _check_complete(model, folder, result.unexpected_keys)
    if half_embeddings:
        halve_embeddings(model)  # wraps the stored float16 tensors, no copy
    model.to(device).eval()
    link_shared_inputs(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(model, tokenizer, str(folder), folder.name, quantized=True)


def _check_complete(model: torch.nn.Module, folder: Path, unexpected: list[str]) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{folder / WEIGHTS_FILE} does not match its config.json ({detail}): "
                        "the folder is corrupt or was edited; quantize the model again")
