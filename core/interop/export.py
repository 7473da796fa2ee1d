"""Export a quantized folder to formats other tools serve.

  squeezellm-pt  the original's packed state dict (``model.pt``: qweight int32, lookup_table
                 float32, every dense weight) plus ``quant_config.json`` ``{"wbits": 4}``, config and
                 tokenizer: a folder vLLM <= 0.6.0 serves with ``--quantization squeezellm``
                 (4-bit, dense-only, input dims a multiple of 32; anything else is refused).
  hf-dense       the dequantized model (``LUT[codes] + sparse``) as an ordinary float16/bfloat16/
                 float32 transformers folder: any engine serves it, at full dense size.
  gguf           one GGUF file of the dequantized weights (core.interop.gguf_export).

Every export writes elsewhere first and renames into place, so nothing half-written appears
at ``output``; cancelling (closing the generator) removes the partial files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from core.layers import SqueezeLinear
from core.progress import ProgressEvent

EXPORT_FORMATS = ("squeezellm-pt", "hf-dense", "gguf")
PT_FILE = "model.pt"
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def export_model(folder: str | Path, fmt: str, output: str | Path, *, dtype: torch.dtype = torch.float16,
                 overwrite: bool = False) -> Generator[ProgressEvent, None, Path]:
    """Export the quantized folder ``folder`` as ``fmt`` (one of EXPORT_FORMATS) to ``output``.

    output: a folder for squeezellm-pt and hf-dense, a ``.gguf`` file for gguf. dtype: the dtype
    of the dense tensors written (float16, bfloat16 or float32; gguf takes float16 or float32;
    the LUTs of squeezellm-pt stay float32). Returns the path written.
    """
    from core.checkpoint import _check_output, load_quantized

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in DENSE_DTYPES:
        raise UserError(f"cannot export {dtype} tensors: choose float16, bfloat16 or float32")
    output = Path(output).expanduser().resolve()
    if fmt == "gguf":
        from core.interop.gguf_export import check_gguf_output

        check_gguf_output(output, dtype, overwrite)
    else:
        _check_output(output, overwrite)
    yield ProgressEvent("load", 0, 1, f"loading {folder}")
    loaded = load_quantized(folder)
    yield ProgressEvent("load", 1, 1, f"loaded {loaded.name}")
    if fmt == "gguf":
        from core.interop.gguf_export import write_gguf

        return (yield from write_gguf(loaded, Path(folder), output, dtype))
    writer = _write_squeezellm_pt if fmt == "squeezellm-pt" else _write_hf_dense
    return (yield from _into_place(output, overwrite, lambda tmp: writer(loaded, tmp, dtype)))


def _into_place(output: Path, overwrite: bool, write) -> Generator[ProgressEvent, None, Path]:
    """Run ``write(tmp_folder)`` (a generator) and rename the finished folder to ``output``."""
    from core.checkpoint import _move_into_place

    from core.litter import sweep, temp_path

    output.parent.mkdir(parents=True, exist_ok=True)
    sweep(output.parent)  # exports a killed process left behind
    tmp = temp_path(output)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield from write(tmp)
        _move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    yield ProgressEvent("save", 1, 1, f"exported {output}")
    return output


# ---------------------------------------------------------------- squeezellm-pt


def vllm_export_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written in the format vLLM's SqueezeLLM loader reads (None if it can)."""
    from core.embed_head import record

    quantized = {n: m for n, m in model.named_modules() if callable(getattr(m, "layout", None))}
    if not quantized:
        return "the model has no quantized layers"
    if record(model):
        return ("its token embedding or output head is stored as lookup-table codes and vLLM's SqueezeLLM loader "
                "reads them dense: quantize with --embed-bits 16 --head-bits 16")
    for name, module in quantized.items():
        if not isinstance(module, SqueezeLinear):
            return f"{name} is a {type(module).__name__} (a round-to-nearest baseline), not a SqueezeLLM layer"
        if module.bits != 4:
            return f"it is {module.bits}-bit and vLLM's SqueezeLLM loader reads only 4-bit weights"
        if module.nnz:
            return ("it is dense-and-sparse and vLLM's SqueezeLLM loader has no sparse part "
                    f"({name} holds {module.nnz} sparse values)")
        if module.in_features % 32:
            return (f"{name} has {module.in_features} inputs, not a multiple of 32, and the original "
                    "format has no padding")
    return None


def vllm_shape_warning(model: nn.Module) -> str | None:
    """A warning when some layer is not made of whole 128x128 blocks, which vLLM's SqueezeLLM kernel
    assumes without checking (SPEC B); the file itself is still valid."""
    for name, module in model.named_modules():
        if isinstance(module, SqueezeLinear) and (module.in_features % 128 or module.out_features % 128):
            return (f"warning: {name} is {module.out_features}x{module.in_features}, not a multiple of 128 both "
                    "ways; vLLM's SqueezeLLM kernel reads whole blocks of 128 and may return garbage for this "
                    "model (the original's loader and Squeeze Studio read the file correctly)")
    return None


def squeezellm_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The original's flat state dict: ``P.qweight`` int32 [in/8, out], ``P.lookup_table`` float32
    [out, 16] (and ``P.bias``) per quantized layer, every other tensor in ``dtype`` (tied weights
    stay one tensor)."""
    quantized = {n for n, m in model.named_modules() if isinstance(m, SqueezeLinear)}
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        prefix, _, part = key.rpartition(".")
        if prefix in quantized and part.startswith("sparse_"):
            continue
        if prefix in quantized and part == "lookup_table":
            state[key] = tensor.to(torch.float32).contiguous()
        elif tensor.is_floating_point():
            ptr = tensor.untyped_storage().data_ptr()
            state[key] = cast.setdefault(ptr, tensor.detach().to(dtype).contiguous())
        else:
            state[key] = tensor.contiguous()
    return state


def _write_squeezellm_pt(loaded, tmp: Path, dtype: torch.dtype) -> Generator[ProgressEvent, None, None]:
    problem = vllm_export_problem(loaded.model)
    if problem:
        raise UserError(f"cannot export {loaded.name} as squeezellm-pt: {problem}. Quantize it 4-bit dense-only "
                        "with a float16 embedding and head for vLLM (--bits 4 --outlier-percent 0 --sensitivity 0 "
                        "--embed-bits 16 --head-bits 16), or export hf-dense or gguf")
    warning = vllm_shape_warning(loaded.model)
    if warning:
        yield ProgressEvent("warning", 0, 0, warning)
    yield ProgressEvent("save", 0, 3, "saving: packed state dict")
    torch.save(squeezellm_state(loaded.model, dtype), tmp / PT_FILE)
    yield ProgressEvent("save", 1, 3, "saving: config and tokenizer")
    (tmp / "quant_config.json").write_text(json.dumps({"wbits": 4}) + "\n")
    _save_dense_config(loaded.model, tmp, dtype)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(tmp)
    yield ProgressEvent("save", 2, 3, "saving: moving into place")


def _save_dense_config(model: nn.Module, tmp: Path, dtype: torch.dtype) -> None:
    """config.json without a quantization block (vLLM and transformers would act on it)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


# ---------------------------------------------------------------- hf-dense


def dequantize_in_place(model: nn.Module, dtype: torch.dtype) -> Generator[ProgressEvent, None, nn.Module]:
    """Replace every quantized layer by an ``nn.Linear`` holding its dequantized weight; the whole
    model ends in ``dtype``. Returns the model."""
    quantized = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "layout", None))]
    for i, (name, module) in enumerate(quantized):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dequantize().to(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        model.set_submodule(name, linear)
        yield ProgressEvent("dequantize", i + 1, len(quantized), f"dequantized {name}")
    return model.to(dtype)


def _write_hf_dense(loaded, tmp: Path, dtype: torch.dtype) -> Generator[ProgressEvent, None, None]:
    model = yield from dequantize_in_place(loaded.model, dtype)
    yield ProgressEvent("save", 0, 1, "saving: dense weights")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    model.save_pretrained(tmp)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(tmp)
