"""The streaming engine on a GPU gives the CPU path's result (issue 19): a tiny LLaMA quantized both ways.

Needs an NVIDIA GPU (skipped without one). Self-contained: a byte-level tokenizer and the README as
calibration and evaluation text, so it runs where the demo model is not installed (a lent GPU machine).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.config import CalibrationConfig, OutlierConfig, QuantConfig
from core.pipeline import QuantizeJob, run_quantize_job
from core.progress import run_to_end

ROOT = Path(__file__).resolve().parents[2]
CAL = CalibrationConfig(source=str(ROOT / "README.md"), samples=4, seqlen=64)
CONFIG = QuantConfig(bits=3, outliers=OutlierConfig(percent=0.45), sensitivity_percent=0.05,
                     embed_bits=16, head_bits=16)


def byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens and an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


@pytest.fixture
def tiny_byte_folder(tmp_path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quantize(folder: Path, output: Path, device: str):
    job = QuantizeJob(model=str(folder), output=output, config=CONFIG, calibration=CAL, device=device)
    return run_to_end(run_quantize_job(job))


def mean_loss(folder: Path, windows: torch.Tensor) -> float:
    from core.checkpoint import load_quantized

    model = load_quantized(folder).model
    with torch.no_grad():
        return float(model(windows, labels=windows).loss)


@pytest.mark.cuda
def test_gpu_streaming_gives_the_cpu_paths_model(tiny_byte_folder, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    from safetensors.torch import load_file

    from core.checkpoint import load_quantized
    from core.layers import SqueezeLinear

    monkeypatch.setenv("SQUEEZE_FISHER_CACHE_GB", "0")  # both runs compute their own Fisher
    monkeypatch.setenv("SQUEEZE_KERNELS", "torch")  # the same k-means code on both devices
    on_cpu = quantize(tiny_byte_folder, tmp_path / "cpu", "cpu")
    torch.cuda.reset_peak_memory_stats()
    on_gpu = quantize(tiny_byte_folder, tmp_path / "gpu", "cuda")
    assert torch.cuda.max_memory_allocated() > 0, "the GPU run did not compute on the GPU"
    assert on_gpu.bits_per_weight == pytest.approx(on_cpu.bits_per_weight, rel=1e-3)
    assert on_gpu.range_multiplier == pytest.approx(on_cpu.range_multiplier)

    cpu_layers = {n: m for n, m in load_quantized(tmp_path / "cpu").model.named_modules()
                  if isinstance(m, SqueezeLinear)}
    gpu_model = load_quantized(tmp_path / "gpu").model
    gpu_layers = {n: m for n, m in gpu_model.named_modules() if isinstance(m, SqueezeLinear)}
    assert set(gpu_layers) == set(cpu_layers) and len(cpu_layers) == 4 * 7
    original = load_file(tiny_byte_folder / "model.safetensors")
    differing, error_ratios = [], []
    for name, cpu_layer in cpu_layers.items():
        gpu_w, cpu_w = gpu_layers[name].dequantize(), cpu_layer.dequantize()
        differing.append(float(((gpu_w - cpu_w).abs() > 1e-5).float().mean()))
        weight = original[f"{name}.weight"].float()
        error_ratios.append(float((gpu_w - weight).norm() / (cpu_w - weight).norm()))
    print(f"weights differing by > 1e-5: mean {sum(differing) / len(differing):.4f}, max {max(differing):.4f}; "
          f"error ratio GPU/CPU: min {min(error_ratios):.4f}, max {max(error_ratios):.4f}")
    assert sum(differing) / len(differing) < 0.02  # equal but for k-means ties and float order
    assert max(error_ratios) < 1.05 and min(error_ratios) > 0.95

    text = (ROOT / "README.md").read_text()[-4000:]
    tokens = torch.tensor(byte_tokenizer()(text)["input_ids"][:4 * 128]).view(4, 128)
    cpu_loss, gpu_loss = mean_loss(tmp_path / "cpu", tokens), mean_loss(tmp_path / "gpu", tokens)
    print(f"held-out loss: CPU-quantized {cpu_loss:.5f}, GPU-quantized {gpu_loss:.5f}")
    assert math.isfinite(gpu_loss)
    assert gpu_loss == pytest.approx(cpu_loss, rel=5e-3)
