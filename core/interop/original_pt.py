"""Import the original SqueezeLLM's packed ``.pt`` checkpoints (SPEC C.2) as quantized folders.

The file is a flat state dict: per quantized linear ``P`` (``model.layers.{i}.self_attn.q_proj``...)
``P.qweight`` int32 [in/32*bits, out] (the GPTQ packing core.packing also uses),
``P.lookup_table`` float32 [out, 2**bits], optionally the CSR residual ``P.rows`` int32 [out+1] /
``P.cols`` int32 [nnz] / ``P.vals`` float32 [nnz] (already "value minus the LUT entry its zeroed
slot decodes to", our convention), optionally hybrid dense rows ``P.full_rows`` float32 [in, topX] /
``P.full_row_indices`` int32 [topX], ``P.bias``; ``sparse_threshold.P`` (python int) and
``P.startrows`` are bookkeeping and ignored. Every other tensor is a dense weight of the model;
LLaMA v1 files hold none, and those weights come from the base model.

The imported layer reproduces the original's dequantization ``LUT[codes] + sparse (+ full rows)``:
codes, LUT (kept float32) and CSR entries are copied bit for bit. Hybrid dense rows are folded
into the sparse residual: the original's kernel *adds* ``full_rows[:, t]`` to output row
``full_row_indices[t]``, so each such row gains one residual entry per input column
(residual + full row value, one float32 addition). Files are read with
``torch.load(weights_only=True)``: a file that would need code to unpickle is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError, describe_memory_error, quote_error
from core.layers import SqueezeLinear
from core.packing import GROUP, csr_row_indices
from core.progress import ProgressEvent

LAYER_PARTS = ("qweight", "lookup_table", "rows", "cols", "vals", "full_rows", "full_row_indices",
               "bias", "startrows")
IGNORED_SUFFIXES = (".startrows", "rotary_emb.inv_freq")  # bookkeeping / recomputed buffers
THRESHOLD_PREFIX = "sparse_threshold."


def read_original_state(ckpt: Path) -> dict[str, torch.Tensor | int]:
    """The flat state dict of ``ckpt`` (tensors stay memory-mapped when the file allows it)."""
    ckpt = Path(ckpt).expanduser()
    if not ckpt.is_file():
        raise UserError(f"{ckpt}: no such checkpoint file: give the path of the .pt file itself")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(ckpt))
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # the pickle names a class or function to import and run
            raise UserError(f"{ckpt}: Squeeze Studio refuses to unpickle code, and this file needs it "
                            f"({_unpickler_detail(exc)}): only plain tensor state dicts are imported; re-save "
                            "it with torch.save(model.state_dict()) in an environment you trust") from exc
        raise _unreadable(ckpt, exc) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _unreadable(ckpt, exc) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError(f"{ckpt} does not hold a state dict (it holds {type(state).__name__}): give a "
                        "packed SqueezeLLM checkpoint written by the original's pack.py")
    return state


def _unpickler_detail(exc: BaseException) -> str:
    return quote_error(exc, 200)  # the global it wants, never torch's advice to turn the check off


def _unreadable(ckpt: Path, exc: BaseException) -> UserError:
    memory = describe_memory_error(exc)  # a failed allocation is not a damaged file
    if memory is not None:
        return UserError(f"{ckpt}: not enough memory to read this checkpoint: {memory}")
    lines = [line.strip() for line in str(exc).splitlines() if "unsupported" in line.lower()]
    detail = quote_error(RuntimeError(lines[0]) if lines else exc, 200)
    return UserError(f"{ckpt} is not a readable PyTorch checkpoint ({type(exc).__name__}: {detail}): "
                     "the file is truncated, corrupt or not a .pt file; download it again")


def split_original_state(state: dict) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(prefix -> {part: tensor} of each quantized layer, name -> tensor of every other weight)."""
    prefixes = {k[: -len(".qweight")] for k in state if k.endswith(".qweight")}
    if not prefixes:
        raise UserError("the checkpoint holds no quantized layers (no '*.qweight' tensors): it is not a "
                        "packed SqueezeLLM checkpoint")
    layers: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    dense: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, _, part = key.rpartition(".")
        if key.startswith(THRESHOLD_PREFIX) or key.endswith(IGNORED_SUFFIXES):
            continue
        if prefix in layers and part in LAYER_PARTS:
            layers[prefix][part] = value
        elif isinstance(value, torch.Tensor):
            dense[key] = value
    return layers, dense


def infer_bits(qweight: torch.Tensor, in_features: int, name: str, bits: int | None = None) -> int:
    """Bit width from qweight's row count (rows = ceil(in/32) * bits); checks ``bits`` when given."""
    groups = -(-in_features // GROUP)
    words = qweight.shape[0]
    found = words // groups if words % groups == 0 else None
    if found not in (2, 3, 4) or (bits is not None and found != bits):
        expected = f"{groups * bits} rows for {bits}-bit" if bits else "2, 3 or 4 bits"
        raise UserError(f"{name}.qweight has {words} rows for {in_features} inputs, which is not {expected}: "
                        "the checkpoint does not belong to this base model (or give the right --bits)")
    return found


def _check_csr(name: str, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape) -> None:
    out_features, in_features = shape
    nnz = vals.numel()
    ok = (rows.numel() == out_features + 1 and cols.numel() == nnz and int(rows[0]) == 0
          and int(rows[-1]) == nnz and bool((rows[1:] >= rows[:-1]).all())
          and (nnz == 0 or (int(cols.min()) >= 0 and int(cols.max()) < in_features)))
    if not ok:
        raise UserError(f"the sparse part of {name} (rows/cols/vals) is inconsistent with its "
                        f"{out_features}x{in_features} shape: the checkpoint is corrupt; download it again")


def fold_dense_rows(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, full_rows: torch.Tensor,
                    row_indices: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add hybrid dense rows to a CSR residual.

    rows int32 [out+1], cols int32 [nnz], vals float32 [nnz]; full_rows float [in, topX] (column t
    is added to output row ``row_indices[t]``). Returns a new CSR (sorted columns, no duplicate
    entries) whose dense form is ``csr + scatter(full_rows^T)``; zero additions create no entries.
    """
    out_features, in_features = shape
    index = row_indices.to(torch.int64)
    touched = torch.unique(index)  # sorted
    entry_rows = csr_row_indices(rows, vals.numel())
    slot = torch.searchsorted(touched, entry_rows).clamp(max=max(touched.numel() - 1, 0))
    in_touched = touched[slot] == entry_rows if touched.numel() else torch.zeros_like(entry_rows, dtype=torch.bool)
    block = torch.zeros(touched.numel(), in_features, dtype=torch.float32)
    present = torch.zeros_like(block, dtype=torch.bool)
    picked_cols = cols[in_touched].to(torch.int64)
    block.index_put_((slot[in_touched], picked_cols), vals[in_touched].float(), accumulate=True)
    present[slot[in_touched], picked_cols] = True
    block.index_add_(0, torch.searchsorted(touched, index), full_rows.t().to(torch.float32))
    block_rows, block_cols = (present | (block != 0)).nonzero(as_tuple=True)
    all_rows = torch.cat([entry_rows[~in_touched], touched[block_rows]])
    all_cols = torch.cat([cols[~in_touched].to(torch.int64), block_cols])
    all_vals = torch.cat([vals[~in_touched].float(), block[block_rows, block_cols]])
    order = torch.argsort(all_rows * in_features + all_cols)
    new_rows = torch.zeros(out_features + 1, dtype=torch.int32)
    new_rows[1:] = torch.bincount(all_rows, minlength=out_features).cumsum(0)
    return new_rows, all_cols[order].to(torch.int32), all_vals[order]


def _sparse_parts(name: str, parts: dict, shape) -> tuple[tuple | None, int]:
    """(rows, cols, vals) or None, and the number of dense rows folded in."""
    out_features, in_features = shape
    sparse = None
    if "vals" in parts:
        sparse = (parts["rows"].to(torch.int32), parts["cols"].to(torch.int32), parts["vals"].float())
        _check_csr(name, *sparse, shape)
    full = parts.get("full_rows")
    if full is None or full.numel() == 0:
        return sparse, 0
    indices = parts.get("full_row_indices")
    if (indices is None or full.dim() != 2 or full.shape[0] != in_features or indices.numel() != full.shape[1]
            or int(indices.min()) < 0 or int(indices.max()) >= out_features):
        raise UserError(f"the dense rows of {name} (full_rows/full_row_indices) do not fit its "
                        f"{out_features}x{in_features} shape: the checkpoint is corrupt")
    if sparse is None:
        sparse = (torch.zeros(out_features + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                  torch.zeros(0, dtype=torch.float32))
    return fold_dense_rows(*sparse, full, indices, shape), int(full.ne(0).any(dim=0).sum())


def squeeze_from_original(name: str, parts: dict, linear: nn.Linear,
                          bits: int | None = None) -> tuple[SqueezeLinear, int]:
    """(SqueezeLinear with float32 LUT, dense rows folded) for one layer of the original's file.

    ``linear`` (on any device, meta included) gives in/out features and, when the file has no
    ``bias`` of its own, the bias.
    """
    if "lookup_table" not in parts or ("vals" in parts) != ("rows" in parts and "cols" in parts):
        raise UserError(f"{name} lacks its lookup_table or part of rows/cols/vals: the checkpoint is incomplete")
    qweight = parts["qweight"]
    shape = (linear.out_features, linear.in_features)
    layer_bits = infer_bits(qweight, linear.in_features, name, bits)
    lut = parts["lookup_table"]
    if qweight.dtype != torch.int32 or qweight.shape[1] != shape[0] or tuple(lut.shape) != (shape[0], 1 << layer_bits):
        raise UserError(f"{name}: qweight {tuple(qweight.shape)} / lookup_table {tuple(lut.shape)} do not fit a "
                        f"{shape[0]}x{shape[1]} {layer_bits}-bit layer: the checkpoint does not belong to "
                        "this base model")
    sparse, folded = _sparse_parts(name, parts, shape)
    bias = parts.get("bias")
    if bias is None and linear.bias is not None:
        if linear.bias.is_meta:
            raise UserError(f"{name} has a bias in the model, but neither the checkpoint nor the base holds "
                            "it: give the model the checkpoint was made from (--base)")
        bias = linear.bias.detach()
    module = SqueezeLinear(shape[1], shape[0], layer_bits, sparse[2].numel() if sparse else 0, bias is not None,
                           lut_dtype=torch.float32, bias_dtype=bias.dtype if bias is not None else torch.float32)
    module.qweight.copy_(qweight)
    module.lookup_table.copy_(lut.float())
    if sparse is not None:
        for buffer, value in zip((module.sparse_rows, module.sparse_cols, module.sparse_vals), sparse):
            buffer.copy_(value)
    if bias is not None:
        module.bias.copy_(bias)
    return module, folded


def import_original_checkpoint(ckpt: str | Path, base: str | None, output: str | Path, bits: int | None = None,
                               *, overwrite: bool = False) -> Generator[ProgressEvent, None, Path]:
    """Convert the original's packed ``.pt`` into a quantized folder at ``output``; returns its path.

    base: the original (dense) model the checkpoint was made from: a folder, ``"demo"``, a hub name
    or a .gguf file. It gives config, tokenizer and the weights the file lacks. ``None``: the
    checkpoint's own folder must hold config.json and the tokenizer (a vLLM-style folder), and the
    file must hold every dense weight. bits: expected bit width (checked; inferred when None).
    """
    from core.checkpoint import _check_output, save_quantized
    from core.interop.base_model import open_base

    ckpt, output = Path(ckpt).expanduser(), Path(output).expanduser().resolve()
    _check_output(output, overwrite)
    yield ProgressEvent("read", 0, 1, f"reading {ckpt.name}")
    layers, dense = split_original_state(read_original_state(ckpt))
    yield ProgressEvent("read", 1, 1, f"{len(layers)} quantized layers, {len(dense)} other tensors")
    source = open_base(base, ckpt)
    model = source.skeleton(dense)
    folded = 0
    for i, name in enumerate(sorted(layers, key=_natural_key)):
        linear, parts = _find_linear(model, name), layers[name]
        if "bias" not in parts and linear.bias is not None:  # the file may leave biases to the base
            parts = {**parts, **{"bias": t for t in source.tensors({f"{name}.bias"}).values()}}
        module, rows_folded = squeeze_from_original(name, parts, linear, bits)
        model.set_submodule(name, module)
        folded += rows_folded
        yield ProgressEvent("convert", i + 1, len(layers), f"converted {name}")
    from_base = source.fill_dense(model, dense)
    settings = _settings(model, ckpt, base, folded, from_base)
    # the embeddings stay as the source has them: the import reproduces the original's model exactly
    return (yield from save_quantized(model, source.tokenizer, output, settings, overwrite=overwrite,
                                      half_embeddings=False))


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """'model.layers.10.x' sorts after 'model.layers.2.x'."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def _find_linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise UserError(f"the checkpoint quantizes {name!r}, which is not a linear layer of the base model: "
                        "give the model the checkpoint was made from (--base)")
    return module


def _settings(model: nn.Module, ckpt: Path, base: str | None, folded: int, from_base: int) -> dict:
    squeeze = [m for m in model.modules() if isinstance(m, SqueezeLinear)]
    n_weights = sum(m.in_features * m.out_features for m in squeeze)
    n_bytes = sum(m.storage_bytes() for m in squeeze)
    nnz = sum(m.nnz for m in squeeze)
    bit_widths = sorted({m.bits for m in squeeze})
    return {"config": {"method": "squeezellm", "bits": bit_widths[0] if len(bit_widths) == 1 else bit_widths},
            "source_model": str(base) if base else str(ckpt.parent),
            "imported_from": {"format": "squeezellm-pt", "file": ckpt.name, "layers": len(squeeze),
                              "dense_rows_folded": folded, "tensors_from_base": from_base},
            "bits_per_weight": 8.0 * n_bytes / max(1, n_weights),
            "sparse_percent": 100.0 * nnz / max(1, n_weights)}
