"""Convert a GGUF file once, tensor by tensor, into a plain safetensors folder (and cache it).

Transformers' own GGUF load dequantizes the whole model into memory. Here the file is memory-mapped
with gguf-py and each tensor is dequantized, un-permuted and written on its own, so the conversion
holds one tensor's dense copy at a time (plus the mapped file pages the OS may keep), whatever the
model's size. Names and layout fixes come from transformers' legacy GGUF machinery, the same pieces
``from_pretrained(..., gguf_file=...)`` runs per tensor: ``get_gguf_hf_weights_map`` for the names,
the architecture's ``TensorProcessor.process`` for llama.cpp's q/k permutation and friends. Config,
generation config and tokenizer come from transformers' metadata readers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch

from core.errors import UnsupportedModelError, UserError
from core.litter import sweep, temp_path
from core.paths import cache_dir
from core.progress import ProgressEvent, run_to_end
from core.shard_writer import ShardWriter

CONVERTER_VERSION = 1  # bump when the output changes, so cached folders are rebuilt
SHARD_BYTES = 2 * 1024**3
DEQUANT_CHUNK_ELEMENTS = 1 << 22  # rows are dequantized in chunks of about this many values
FP16_MAX = float(torch.finfo(torch.float16).max)
STORABLE = (torch.float32, torch.float16, torch.bfloat16)
# transformers' processors that merge or split mixture-of-experts weights across several GGUF tensors
STACKED_EXPERT_PROCESSORS = {"Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor"}


def gguf_folder(path: Path, *, dtype: torch.dtype | None = None) -> Path:
    """The cached safetensors folder converted from GGUF ``path`` (see ``convert_gguf`` for ``dtype``)."""
    return run_to_end(cached_gguf_conversion(path, dtype=dtype))


def cached_gguf_conversion(path: Path, *, dtype: torch.dtype | None = None
                           ) -> Generator[ProgressEvent, None, Path]:
    """Like ``gguf_folder`` with progress: converts (yielding "convert" events) unless already cached.

    The cache folder, under ``cache_dir()/models``, is keyed by the file's resolved path, size and
    mtime, the transformers version (folders written by 5.x do not load right in 4.x), ``dtype`` and
    this converter's version.
    """
    target = cache_dir() / "models" / _cache_name(Path(path), dtype)
    if (target / "config.json").is_file():
        return target
    try:
        return (yield from convert_gguf(Path(path), target, dtype=dtype))
    except FileExistsError:
        if (target / "config.json").is_file():  # another process finished the same conversion first
            return target
        raise


def _cache_name(path: Path, dtype: torch.dtype | None) -> str:
    import transformers

    resolved = path.expanduser().resolve()
    stat = resolved.stat()
    dtype_tag = "auto" if dtype is None else str(dtype).removeprefix("torch.")
    key = json.dumps([str(resolved), stat.st_size, stat.st_mtime_ns, transformers.__version__, dtype_tag,
                      CONVERTER_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{resolved.stem}-{dtype_tag}-tf{transformers.__version__}-{digest}"


def convert_gguf(path: Path, target: Path, *, dtype: torch.dtype | None = None
                 ) -> Generator[ProgressEvent, None, Path]:
    """Write GGUF ``path`` as a transformers folder at ``target``, one tensor at a time.

    Yields ``ProgressEvent("convert", 0, 0)`` while it reads the metadata, then one
    ``ProgressEvent("convert", done, total)`` per GGUF tensor, and returns ``target``.
    One-dimensional F32 tensors of the file (norms, biases) stay float32; every other tensor is
    stored in ``dtype`` (float32, float16 or bfloat16). ``dtype=None`` picks bfloat16 when the file
    holds BF16 tensors, float32 when it holds only F32 ones, else float16 (F16 or quantized). A tensor
    whose values would overflow float16 is kept in float32 instead.
    Weights go to ``model.safetensors``, or to shards of at most ``SHARD_BYTES`` with
    ``model.safetensors.index.json``; config.json, generation_config.json and the tokenizer files
    come from transformers' GGUF metadata readers.

    The folder is written next to ``target`` and renamed into place at the end, so a failure or a
    cancel (closing the generator) leaves nothing behind. ``FileExistsError`` when ``target`` exists
    and is not empty. ``UserError`` for a file gguf-py cannot parse (truncated, damaged), a
    quantization type it cannot dequantize, or an architecture transformers has no per-tensor
    mapping for (``UnsupportedModelError``, naming it).
    """
    if dtype is not None and dtype not in STORABLE:
        raise ValueError(f"dtype {dtype} cannot be stored: pick torch.float32, torch.float16 or torch.bfloat16")
    path, target = Path(path), Path(target)
    yield ProgressEvent("convert", 0, 0, f"reading the metadata of {path.name}")
    reader = _open_reader(path)
    architecture = _architecture(reader, path)  # UserError when it has no per-tensor mapping
    reader.fields.clear()  # the vocabulary parsed into small arrays: ~150 MiB for 49 k tokens, not needed
    model, processor, name_map = _transformers_pieces(path, architecture)
    dtype = dtype or _default_dtype({t.tensor_type for t in reader.tensors})
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    sweep(target.parent)  # what killed conversions left behind
    staging = temp_path(target)  # .{name}.{host}-{pid}.partial: swept if this process dies
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writer = None
    try:
        writer = ShardWriter(staging, max_shard_bytes=SHARD_BYTES)
        written: set[str] = set()
        total = len(reader.tensors)
        for done, tensor in enumerate(reader.tensors, 1):
            note = _write_tensor(tensor, processor, name_map, writer, dtype, written)
            yield ProgressEvent("convert", done, total, note)
        _check_complete(model, written, path)
        writer.close()
        _write_metadata(path, staging, model, dtype)
        try:
            os.rename(staging, target)  # atomic; fails when another writer filled target meanwhile
        except OSError as exc:
            raise FileExistsError(f"{target} appeared while converting") from exc
    finally:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _open_reader(path: Path):
    """gguf-py's reader over the memory-mapped file; UserError when the file cannot be parsed."""
    import gguf

    try:
        return gguf.GGUFReader(path)  # tensor data is read only when touched
    except MemoryError:
        raise
    except Exception as exc:  # gguf-py raises ValueError, IndexError, ... for a truncated or damaged file
        raise UserError(f"{path}: this GGUF file does not load ({type(exc).__name__}: {_first_line(exc)}): "
                        "it is truncated, or its architecture or quantization type is not supported by "
                        "transformers' GGUF reader; try the model's safetensors folder instead") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _architecture(reader, path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import (GGUF_SUPPORTED_ARCHITECTURES, TENSOR_PROCESSORS,
                                                          TensorProcessor, read_field)

    found = read_field(reader, "general.architecture")
    if not found:
        raise UserError(f"{path}: the GGUF file names no architecture (general.architecture): it is not a model")
    architecture = str(found[0])
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        raise UnsupportedModelError(
            f"{path}: the GGUF architecture {architecture!r} has no tensor mapping in transformers "
            f"{transformers.__version__}'s GGUF reader: give the model's safetensors folder instead")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if {cls.__name__ for cls in processor.__mro__} & STACKED_EXPERT_PROCESSORS:
        raise UnsupportedModelError(
            f"{path}: the GGUF architecture {architecture!r} stores its experts stacked across tensors, "
            "which cannot be converted one tensor at a time: give the model's safetensors folder instead")
    return architecture


def _transformers_pieces(path: Path, architecture: str):
    """(model on the meta device, its TensorProcessor, {gguf name: transformers name})."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    try:
        with torch.device("meta"):  # names and shapes only, no memory
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UnsupportedModelError(f"{path}: a {config.model_type!r} model is not a causal language model: "
                                    "pick a decoder LM (LLaMA, Mistral, Qwen2...)") from exc
    # The processor gets the raw parsed metadata, exactly as transformers' own GGUF load gives it.
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    # Named by the file's architecture rather than the config's model type: a Mistral GGUF says "llama"
    # (transformers' own load asks gguf-py for a "mistral" table, which it does not have, and fails).
    return model, processor, get_gguf_hf_weights_map(model, processor, model_type=architecture)


def _write_tensor(tensor, processor, name_map: dict[str, str], writer: ShardWriter, dtype: torch.dtype,
                  written: set[str]) -> str:
    """Dequantize, fix and write one GGUF tensor; a line for the progress event. Its dense copies are
    locals of this call, so they are freed before the next tensor is read."""
    note = f"{tensor.name}: not used by the model"
    for name, value in _converted(tensor, processor, name_map):
        stored = _storage_dtype(value, tensor.tensor_type, dtype)
        writer.add(name, value.to(stored))
        written.add(name)
        note = f"{name} {tuple(value.shape)} {tensor.tensor_type.name} -> {str(stored).removeprefix('torch.')}"
    return note


def _converted(tensor, processor, name_map: dict[str, str]):
    """[(transformers name, float32 tensor)] for one GGUF tensor: dequantized, then fixed by the processor.

    Usually one pair; none for a tensor the model does not use; processors that rename on their own
    (GPT-2's ``output.weight``) put theirs in ``parsed_parameters["tensors"]``.
    """
    try:
        weights = _dequantize(tensor)
    except NotImplementedError as exc:
        raise UserError(f"{tensor.name} is stored as {tensor.tensor_type.name}, which gguf-py cannot "
                        "dequantize: upgrade gguf (pip install -U gguf) or give the model's safetensors "
                        "folder instead") from exc
    own: dict[str, dict] = {"tensors": {}}
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                               parsed_parameters=own)
    if result.name is None:
        return list(own["tensors"].items())
    if result.name not in name_map:
        return []
    return [(name_map[result.name], torch.from_numpy(np.ascontiguousarray(result.weights)))]


def _dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as a new float32 array in torch dimension order (what ``gguf.quants.dequantize``
    gives for the whole tensor), dequantized a chunk of rows at a time to bound the temporaries."""
    from gguf.quants import dequantize, quant_shape_from_byte_shape

    data = tensor.data
    quantized = data.dtype == np.uint8
    shape = quant_shape_from_byte_shape(data.shape, tensor.tensor_type) if quantized else data.shape
    out = np.empty(shape, dtype=np.float32)
    rows_in, rows_out = data.reshape(-1, data.shape[-1]), out.reshape(-1, shape[-1])
    step = max(1, DEQUANT_CHUNK_ELEMENTS // shape[-1])
    for start in range(0, rows_out.shape[0], step):
        rows_out[start:start + step] = dequantize(rows_in[start:start + step], tensor.tensor_type)
    return out


def _default_dtype(tensor_types: set) -> torch.dtype:
    from gguf import GGMLQuantizationType as Q

    if Q.BF16 in tensor_types:
        return torch.bfloat16
    if tensor_types <= {Q.F32}:
        return torch.float32
    return torch.float16  # F16 or quantized blocks: float16 keeps more mantissa than bfloat16


def _storage_dtype(value: torch.Tensor, tensor_type, dtype: torch.dtype) -> torch.dtype:
    import gguf

    if not value.is_floating_point():
        return value.dtype
    if tensor_type == gguf.GGMLQuantizationType.F32 and value.dim() <= 1:
        return torch.float32  # norms and biases: tiny, and llama.cpp kept them exact on purpose
    if dtype == torch.float16 and value.numel():
        low, high = torch.aminmax(value)
        if max(-float(low), float(high)) > FP16_MAX:
            return torch.float32  # would become inf in float16
    return dtype


def _check_complete(model, written: set[str], path: Path) -> None:
    """Every parameter of the model must come from the file (tied ones are shared, not stored)."""
    missing = [name for name, _ in model.named_parameters() if name not in written]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{path}: the GGUF file has no tensor for {shown}: it is incomplete or not a "
                        f"{type(model).__name__}; give the model's safetensors folder instead")


def _write_metadata(path: Path, folder: Path, model, dtype: torch.dtype) -> None:
    """config.json (stored dtype, architecture), generation_config.json and the tokenizer files."""
    from transformers import AutoTokenizer

    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
