"""Does a quantized folder hold what its config.json says? Checked from the safetensors headers alone.

``config.json`` (the model config and the ``quantization_config`` layout of every quantized module)
implies the name and shape of every tensor; the weight files (``model.safetensors``, or the shards a
``model.safetensors.index.json`` names) say what is there. Reading only the headers makes the check
cheap enough for ``squeeze info`` and for every load: a folder edited by hand (bits changed, a
tensor dropped) is one line naming the folder and the first difference, never a traceback of
hundreds of ``size mismatch`` lines from ``load_state_dict``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from core.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REQUANTIZE = "the folder is corrupt or was edited; quantize the model again"


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of ``folder``: the shards its index names, else ``model.safetensors``.

    UserError when the index is unreadable or a weight file is missing.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is unreadable ({exc}): {REQUANTIZE}") from exc
        files = [folder / name for name in names]
    else:
        files = [folder / SINGLE_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder} lacks its weight file {missing[0]}: copy the whole folder again, or "
                        "quantize the model again")
    return files


def stored_shapes(folder: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, file name) of every tensor in ``folder``'s weight files, from their headers only."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), path.name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path} is corrupt ({exc}): {REQUANTIZE}") from exc
    return shapes


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a folder of ``model`` (meta tensors are fine) stores.

    Tied tensors count once, under their first name, as the folder writer stores them.
    """
    seen: set[int] = set()
    shapes = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        shapes[key] = tuple(tensor.shape)
    return shapes


def check_shapes(folder: str | os.PathLike, model: nn.Module) -> None:
    """UserError naming the first tensor whose stored shape is not the one ``model`` expects.

    model: the skeleton the folder will be loaded into (quantized modules built from the layout); its
    weights are tied first, as loading does. Missing tensors, shape differences and tensors the model does not have are all reported.
    """
    folder = Path(folder)
    stored = stored_shapes(folder)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # as loading does: a tied head is stored once, under the embedding's name
    expected = expected_shapes(model)
    for name, shape in expected.items():
        if name not in stored:
            raise UserError(f"{folder} does not match its config.json: tensor {name} {list(shape)} is missing "
                            f"from the weights: {REQUANTIZE}")
        found, file = stored[name]
        if found != shape:
            raise UserError(f"{folder} does not match its config.json: {name} is {list(found)} in {file}, but "
                            f"config.json implies {list(shape)}: {REQUANTIZE}")
    extra = [name for name in stored if name not in expected]
    if extra:
        raise UserError(f"{folder} does not match its config.json: {stored[extra[0]][1]} holds {extra[0]}, which "
                        f"the model does not have ({len(extra)} such tensors): {REQUANTIZE}")


def quantized_skeleton(folder: str | os.PathLike, block: dict) -> nn.Module:
    """The model of ``folder`` on the meta device with its quantized modules built from ``block``
    (the ``quantization_config``). UserError when the layout describes a module that cannot exist
    (e.g. 5 bits)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.checkpoint import build_quantized_module, layer_bits

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder}/config.json does not describe a model ({exc}): {REQUANTIZE}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    widths = layer_bits(block)
    for name, info in (block.get("modules") or {}).items():
        try:
            model.get_submodule(name)
            module = build_quantized_module({**info, "bits": widths[name]})
        except (UserError, AttributeError, KeyError, TypeError, ValueError) as exc:
            reason = exc.__cause__ if isinstance(exc, UserError) and exc.__cause__ else exc
            raise UserError(f"{folder}/config.json describes quantized module {name!r} that cannot exist "
                            f"({reason}): {REQUANTIZE}") from exc
        model.set_submodule(name, module)
    if block.get("embed_head"):  # a quantized embedding / head (core.embed_head)
        from core.embed_head import empty_modules, install

        install(model, empty_modules(model, block["embed_head"]))
    model.tie_weights()  # a tied head is stored once, under the embedding's name
    return model


def check_quantized_folder(folder: str | os.PathLike) -> dict:
    """Check ``folder`` whole (config.json, layout, every tensor's shape) without reading the weights.

    Returns its ``quantization_config`` block; UserError naming the folder and the first problem.
    """
    from core.checkpoint import read_quantization_config

    block = read_quantization_config(folder)
    check_shapes(folder, quantized_skeleton(folder, block))
    return block
