"""Shared fixtures: offscreen Qt, tiny models built from configs, the demo tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_ARCHS = ("llama", "mistral", "qwen2", "opt")


def tiny_config(arch: str, vocab_size: int = 49152, hidden_size: int = 64):
    """A 2-block config of the given family, hidden size 64 unless told (seconds to build and run)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=512)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4,
                            word_embed_proj_dim=64, **common)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
    return cls(hidden_size=hidden_size, intermediate_size=160, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True, **common)


def build_tiny_model(arch: str = "llama", seed: int = 0):
    """A randomly initialised tiny causal LM in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_arch):
    return build_tiny_model(tiny_arch)


@pytest.fixture(scope="session")
def demo_dir():
    """The demo model converted once to a plain safetensors folder (cached across runs)."""
    from core.models import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)
