"""The dense model an imported checkpoint belongs to: config, tokenizer and the weights it lacks.

A local folder (or ``"demo"``) is read lazily: config and tokenizer, and only the tensors the
checkpoint does not hold, straight from its safetensors files, so importing a 13B checkpoint
never materialises the dense 13B model. Anything else ``core.models.load_model`` accepts (a hub
name, a .gguf file, a folder with only .bin weights) is loaded whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError, quote_error


@dataclass
class BaseSource:
    """config (transformers PretrainedConfig), tokenizer, and ``tensors(names) -> {name: tensor}``
    for whichever of ``names`` the base has. ``where`` names it in messages; None when the
    checkpoint's own folder stands in for a base."""

    config: object
    tokenizer: object
    tensors: Callable[[set[str]], dict[str, torch.Tensor]]
    where: str | None

    def skeleton(self, dense: dict[str, torch.Tensor]) -> nn.Module:
        """The model on the meta device, in the dtype of the checkpoint's dense tensors (else the
        base's own dtype, else float32)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        if hasattr(self.config, "quantization_config"):
            del self.config.quantization_config
        dtype = _dense_dtype(dense) or _config_dtype(self.config) or torch.float32
        try:
            with init_empty_weights():
                return AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        except ValueError as exc:
            raise UserError(f"{self.where or 'the checkpoint folder'}: its config.json does not describe a "
                            f"causal language model ({quote_error(exc, 200)}): give the original "
                            "model with --base") from exc

    def fill_dense(self, model: nn.Module, dense: dict[str, torch.Tensor]) -> int:
        """Load every weight still on the meta device from the checkpoint, else from the base.

        Returns how many tensors came from the base. UserError when the checkpoint has tensors the
        model does not know, or when some weight is in neither.
        """
        state = model.state_dict(keep_vars=True)
        unexpected = sorted(k for k in dense if k not in state)
        if unexpected:
            raise UserError(f"the checkpoint holds tensors this model does not have ({', '.join(unexpected[:3])}): "
                            "give the model the checkpoint was made from (--base)")
        wanted = {k for k, t in state.items() if t.is_meta}
        dtype = next(p.dtype for p in model.parameters())
        loaded = {k: dense[k].to(dtype) for k in wanted if k in dense}
        from_base = {k: t.to(dtype) for k, t in self.tensors(wanted - loaded.keys()).items()}
        model.load_state_dict({**loaded, **from_base}, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if missing:
            hint = ("give the original model with --base (the file holds only the quantized layers, like the "
                    "LLaMA v1 checkpoints)" if self.where is None else
                    f"{self.where} lacks them too: give the model the checkpoint was made from")
            raise UserError(f"no weights for {', '.join(missing[:3])}: {hint}")
        model.eval()
        return len(from_base)


def _dense_dtype(dense: dict[str, torch.Tensor]) -> torch.dtype | None:
    return next((t.dtype for t in dense.values() if t.is_floating_point()), None)


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def open_base(base: str | None, ckpt: Path) -> BaseSource:
    """Where config, tokenizer and missing weights come from (see the module docstring)."""
    if base is None:
        if not (ckpt.parent / "config.json").is_file():
            raise UserError(f"{ckpt.parent} has no config.json next to the checkpoint: give the original model "
                            "the checkpoint was made from with --base (a folder, a hub name or 'demo')")
        return _folder_source(ckpt.parent, None)
    if str(base).strip() == "demo":
        from core.models import demo_model_dir

        return _folder_source(demo_model_dir(), "demo")
    folder = Path(base).expanduser()
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        return _folder_source(folder, str(base))
    return _loaded_source(str(base))


def _folder_source(folder: Path, where: str | None) -> BaseSource:
    from transformers import AutoConfig, AutoTokenizer

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json: give the original model folder with --base")
    block = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config") or {}
    if block.get("quant_method") == "squeezellm":
        raise UserError(f"{folder} is already a quantized folder: give the original dense model with --base")
    config = AutoConfig.from_pretrained(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers fail in many ways (missing files, sentencepiece absent)
        raise UserError(f"{folder}: its tokenizer does not load ({type(exc).__name__}: {quote_error(exc, 200)}): copy "
                        "tokenizer.json and tokenizer_config.json of the original model into it") from exc
    return BaseSource(config, tokenizer, lambda names: _read_safetensors(folder, names), where)


def _read_safetensors(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``names`` found in ``folder/*.safetensors`` (only those are read)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in names.intersection(handle.keys()) - found.keys():
                found[key] = handle.get_tensor(key)
    return found


def _loaded_source(base: str) -> BaseSource:
    from core.models import load_model

    loaded = load_model(base)
    if loaded.quantized:
        raise UserError(f"{base} is already quantized: give the original dense model with --base")
    state = loaded.model.state_dict()
    return BaseSource(loaded.model.config, loaded.tokenizer,
                      lambda names: {k: state[k] for k in names if k in state}, base)
