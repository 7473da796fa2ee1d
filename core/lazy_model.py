"""A causal LM opened without materialising its weights: one decoder block at a time.

``LazyModel.open(folder)`` reads config.json and the safetensors headers (one file or a sharded
index), builds the transformers model with every parameter on the meta device (buffers such as
rotary frequencies are computed as usual), and finds the decoder blocks by discovery
(``core.models.decoder_blocks``). ``load(module)`` fills a module's parameters from the
memory-mapped shards in the compute dtype; ``release(module)`` puts them back on meta. The
parameters outside the blocks (embedding, final norm, head, learned positions) are loaded once with
``load_outside_blocks``. A tied head shares the embedding's tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from core.folder_check import INDEX_FILE
from core.progress import ProgressEvent



def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (a single file or a sharded index)."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index ({exc}): the folder is corrupt; "
                            "download or save the model again") from exc
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights: convert the model to safetensors "
                        "(transformers save_pretrained) or give a .gguf file")
    names: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    names[name] = file
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise UserError(f"{file} is not a readable safetensors file ({exc}): the weights are corrupt or "
                            "truncated; download or save the model again") from exc
    return names


def folder_fingerprint(folder: Path) -> str:
    """A short hash of a model folder: config.json, every weight file's header and its first and
    last MiB. Cheap for a 70 B folder (no full read) and changes when the weights are replaced."""
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for file in sorted(set(weight_files(folder).values())):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
            h.update(handle.read(min(header, 1 << 24)))
            h.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            h.update(handle.read(1 << 20))
    return h.hexdigest()[:20]


def resolve_folder(spec: str) -> Generator[ProgressEvent, None, Path]:
    """The safetensors folder behind a model spec: "demo", a folder, a .gguf file (converted once,
    cached) or a hub name. A quantized folder is refused: quantize the original."""
    from core.checkpoint import is_quantized_folder
    from core.models import HUB_NAME, _hub_folder, demo_model_dir

    text = str(spec).strip()
    if text == "demo":
        return demo_model_dir()
    path = Path(text).expanduser()
    if path.is_dir():
        if is_quantized_folder(path):
            raise UserError(f"{text} is already quantized: start from the original model")
        return path
    if path.is_file():
        from core.gguf_convert import cached_gguf_conversion
        from core.models import check_gguf_magic

        check_gguf_magic(path)
        return (yield from cached_gguf_conversion(path))
    if HUB_NAME.match(text) and not text.startswith((".", "~", "/")) and path.suffix != ".gguf":
        return _hub_folder(text)
    raise UserError(f"{text}: no such file or folder. Give 'demo', a model folder with config.json, "
                    "a .gguf file, or a hub name like org/model")


class LazyModel:
    """A transformers causal LM whose parameters live on meta until a module is loaded.

    skeleton: the model (parameters on meta, buffers real); blocks: its decoder blocks in order;
    block_prefix: their ModuleList's name ("model.layers"); stored_dtype: the dtype of the
    checkpoint's floating tensors; compute_dtype: the dtype modules are loaded in.
    """

    def __init__(self, folder: Path, config, skeleton: nn.Module, files: dict[str, Path],
                 compute_dtype: torch.dtype) -> None:
        from core.models import _find_block_list

        self.folder, self.config, self.skeleton, self.files = folder, config, skeleton, files
        self.compute_dtype = compute_dtype
        self.block_prefix, self.blocks = _find_block_list(skeleton)
        self._base_prefix = getattr(skeleton, "base_model_prefix", "") or ""
        self.stored_dtype = self._stored_dtype()

    @classmethod
    def open(cls, folder: str | Path, compute_dtype: torch.dtype = torch.float32) -> "LazyModel":
        """Open a transformers folder (config.json + safetensors) lazily; UserError for bad input."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from core.models import _check_architecture, _read_config

        folder = Path(folder).expanduser()
        raw = _read_config(folder)
        _check_architecture(folder, raw)
        files = weight_files(folder)
        config = AutoConfig.from_pretrained(folder)
        try:
            with init_empty_weights():
                skeleton = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
        except ValueError as exc:
            raise UserError(f"{folder}: a {raw.get('model_type')!r} model is not a causal language model: pick a "
                            "decoder LM (LLaMA, Mistral, Qwen2, OPT...)") from exc
        # Tie outside init_empty_weights, whose patched register_parameter would make a new tensor.
        skeleton.tie_weights()
        return cls(folder, config, skeleton.eval(), files, compute_dtype)

    # ------------------------------------------------------------------ tensors

    def _key(self, name: str) -> str:
        """The checkpoint's name for parameter ``name`` (with or without the base model prefix)."""
        if name in self.files:
            return name
        prefix = self._base_prefix + "."
        if self._base_prefix and name.startswith(prefix) and name[len(prefix):] in self.files:
            return name[len(prefix):]
        if self._base_prefix and prefix + name in self.files:
            return prefix + name
        raise KeyError(name)

    def has(self, name: str) -> bool:
        try:
            self._key(name)
        except KeyError:
            return False
        return True

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` (stored dtype, CPU), read from its memory-mapped file.

        The file is mapped for this read only: a mapping kept open would keep every page read so far
        resident (counted in the process's memory) until the kernel needs it back.
        """
        from safetensors import safe_open

        key = self._key(name)
        file = self.files[key]
        try:
            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(key).clone()
        except Exception as exc:
            raise UserError(f"{file}: tensor {key} cannot be read ({exc}): the weights are corrupt or "
                            "truncated; download or save the model again") from exc

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """parameter name (as the skeleton names it) -> its dtype in the checkpoint, from the safetensors
        headers alone (no tensor is read); parameters the checkpoint lacks are left out."""
        from safetensors import safe_open

        keys = {}
        for name, _ in self.skeleton.named_parameters():
            if self.has(name):
                keys.setdefault(self.files[self._key(name)], []).append((name, self._key(name)))
        dtypes = {}
        for file, names in keys.items():
            with safe_open(file, framework="pt") as handle:
                for name, key in names:
                    dtypes[name] = _slice_dtype(handle.get_slice(key).get_dtype())
        return dtypes

    def _stored_dtype(self) -> torch.dtype:
        from safetensors import safe_open

        prefix = f"{self.block_prefix}.0."
        for name, _ in self.blocks[0].named_parameters():
            try:
                key = self._key(prefix + name)
            except KeyError:
                continue
            with safe_open(self.files[key], framework="pt") as handle:
                return _slice_dtype(handle.get_slice(key).get_dtype())
        return torch.float32

    # ------------------------------------------------------------------ modules

    def _owners(self, module: nn.Module, prefix: str) -> dict[int, list[tuple[nn.Module, str, str]]]:
        """id(param) -> [(owning module, attribute, full name)] of module's meta parameters (ties kept)."""
        owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
        for sub_name, sub in module.named_modules(remove_duplicate=False):
            for attr, param in sub._parameters.items():
                if param is None or not param.is_meta:
                    continue
                full = ".".join(p for p in (prefix, sub_name, attr) if p)
                owners.setdefault(id(param), []).append((sub, attr, full))
        return owners

    def load(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> nn.Module:
        """Fill every meta parameter of ``module`` (named ``prefix``) from the checkpoint, in place.

        Tied parameters stay one tensor. Missing tensors are a UserError naming the first one.
        """
        dtype = dtype or self.compute_dtype
        for owners in self._owners(module, prefix).values():
            name = next((full for _, _, full in owners if self.has(full)), None)
            if name is None:
                raise UserError(f"{self.folder}: the weights lack {owners[0][2]}: the checkpoint is incomplete "
                                "or of another architecture; download or save the model again")
            stored = self.tensor(name)
            expected = owners[0][0]._parameters[owners[0][1]].shape
            if tuple(stored.shape) != tuple(expected):
                raise UserError(f"{self.folder}: {name} has shape {tuple(stored.shape)} but config.json implies "
                                f"{tuple(expected)}: the weights and config.json disagree; download the model again")
            value = stored.to(device=device, dtype=dtype if stored.is_floating_point() else stored.dtype)
            param = nn.Parameter(value, requires_grad=False)
            for sub, attr, _ in owners:
                sub._parameters[attr] = param
        return module

    def release(self, module: nn.Module) -> None:
        """Put every parameter of ``module`` back on the meta device (frees its memory)."""
        for sub in module.modules():
            for attr, param in sub._parameters.items():
                if param is not None and not param.is_meta:
                    sub._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)

    def block_name(self, index: int) -> str:
        return f"{self.block_prefix}.{index}"

    def load_block(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        return self.load(self.blocks[index], self.block_name(index), device)

    def load_outside_blocks(self, device: torch.device | str = "cpu") -> None:
        """Load every parameter that is not inside a decoder block (embedding, norms, head) once."""
        block_list = self.skeleton.get_submodule(self.block_prefix)
        saved = [block_list[i] for i in range(len(block_list))]
        for i in range(len(block_list)):
            block_list[i] = nn.Identity()  # hide the blocks from the walk
        try:
            self.load(self.skeleton, "", device)
        finally:
            for i, block in enumerate(saved):
                block_list[i] = block

    def stored_state(self, module: nn.Module, prefix: str, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """name -> stored tensor (stored dtype) of every parameter of ``module`` that the checkpoint has,
        except those of the submodules named in ``skip`` (full names; they are not read)."""
        state = {}
        for name, _ in module.named_parameters(remove_duplicate=True):
            full = f"{prefix}.{name}" if prefix else name
            if full.rsplit(".", 1)[0] not in skip and self.has(full):
                state[full] = self.tensor(full)
        return state


def _slice_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
        name, torch.float32)
