"""The quantized folder of a streaming run, assembled from its staging folder and moved into place.

The blocks' shards are already in the staging folder (``core.staging``); ``write_folder`` adds the
tensors outside the blocks as stored (the token embedding and an untied head of a float32 model in
float16, as ``core.half_head`` serves them, or as LUT codes, ``core.embed_head``), config.json with the ``quantization_config`` block, the
generation config and the tokenizer, then writes one ``model.safetensors`` (folders up to
``MERGE_LIMIT``) or the block shards with ``model.safetensors.index.json``, and renames the result
into place: the output appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn

from core.embed_head import replaced_weights
from core.folder_check import INDEX_FILE, SINGLE_FILE
from core.lazy_model import LazyModel
from core.progress import ProgressEvent
from core.quantize import QuantReport
from core.staging import Staging

MERGE_LIMIT = 2 << 30  # folders up to this size keep today's single model.safetensors
_FP16_MAX = 65504.0


def write_folder(lazy: LazyModel, tokenizer, staging: Staging, settings: dict, report: QuantReport, output: Path,
                 overwrite: bool) -> Generator[ProgressEvent, None, None]:
    """Assemble the folder of a run whose blocks are all in ``staging`` and move it to ``output``.

    settings: the JSON-ready settings for ``quantization_config`` (config, calibration, source);
    the report adds the outlier multiplier, bits per weight and sparse share. Yields "save" events.
    """
    from core.checkpoint import (EMBEDDINGS_DTYPE, FORMAT_VERSION, QUANT_METHOD, _check_output, _move_into_place,
                                 bits_overrides)

    yield ProgressEvent("save", 0, 3, "saving: embedding, head and config")
    final = staging.path / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    embed_head = staging.state.get("embed_head") or {}  # a quantized embedding / head (core.embed_head)
    rest, halved = _outside_tensors(lazy, replaced_weights(embed_head))
    if embed_head:
        from safetensors.torch import load_file

        rest.update(load_file(staging.path / "embed-head.safetensors"))
    layout = {}
    for index in range(len(lazy.blocks)):
        layout.update(staging.state["blocks"][str(index)]["modules"])
    settings = {**settings, "range_multiplier": report.range_multiplier,
                "bits_per_weight": report.bits_per_weight, "sparse_percent": report.sparse_percent}
    overrides = bits_overrides(layout, settings["config"].get("bits"))
    config = _fresh_config(lazy.folder)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **settings,
                                     **({"bits_overrides": overrides} if overrides else {}), "modules": layout}
    if halved:
        config["quantization_config"][EMBEDDINGS_DTYPE] = "float16"
    if embed_head:
        config["quantization_config"]["embed_head"] = embed_head
    (final / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = lazy.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, final / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(final)
    yield ProgressEvent("save", 1, 3, "saving: weights")
    _write_weights(final, staging, len(lazy.blocks), rest)
    yield ProgressEvent("save", 2, 3, "saving: moving into place")
    _check_output(output, overwrite)
    _move_into_place(final, output)
    shutil.rmtree(staging.path, ignore_errors=True)
    yield ProgressEvent("save", 3, 3, f"saved {output}")


def _outside_tensors(lazy: LazyModel, replaced: set[str] = frozenset()) -> tuple[dict[str, torch.Tensor], bool]:
    """Stored tensors outside the blocks (a tied pair once), except the ``replaced`` ones (a quantized
    embedding / head); an embedding / head kept in 16 bits halved for float32 models."""
    skeleton = lazy.skeleton
    seen, rest = set(), {}
    for name, param in skeleton.named_parameters():
        if name.startswith(lazy.block_prefix + ".") or id(param) in seen:
            continue
        seen.add(id(param))
        if lazy.has(name) and name not in replaced:
            rest[name] = lazy.tensor(name)
    embedding, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    names = {id(p): n for n, p in skeleton.named_parameters()}
    emb_name = names.get(id(embedding.weight))
    head_name = names.get(id(head.weight)) if head is not None else None
    if lazy.stored_dtype != torch.float32:
        return rest, False
    targets = [emb_name] if type(embedding) is nn.Embedding and emb_name in rest else []
    if head is not None and head_name != emb_name and type(head) is nn.Linear and head_name in rest:
        targets.append(head_name)  # an untied head (a tied one is the embedding's tensor)
    if not targets or any(float(rest[n].abs().max()) > _FP16_MAX for n in targets):
        return rest, False
    for n in targets:
        rest[n] = rest[n].to(torch.float16)
    return rest, True


def _write_weights(final: Path, staging: Staging, n_blocks: int, rest: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file, save_file

    files = [staging.block_file(i) for i in range(n_blocks)]
    total = sum(f.stat().st_size for f in files) + sum(t.numel() * t.element_size() for t in rest.values())
    if total <= MERGE_LIMIT:
        state = dict(rest)
        for file in files:
            state.update(load_file(file))
        save_file(state, final / SINGLE_FILE, metadata={"format": "pt"})
        return
    n = len(files) + 1
    weight_map = {}
    for k, file in enumerate(files, start=1):
        shard = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.link(file, final / shard) if _same_device(file, final) else shutil.copyfile(file, final / shard)
        from safetensors import safe_open

        with safe_open(final / shard, framework="pt") as handle:
            weight_map.update({key: shard for key in handle.keys()})
    last = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(rest, final / last, metadata={"format": "pt"})
    weight_map.update({key: last for key in rest})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (final / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _fresh_config(folder: Path) -> dict:
    """The source's config as transformers writes it (read anew: building the skeleton may edit it)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).to_dict()
