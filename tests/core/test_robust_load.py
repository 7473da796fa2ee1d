"""Loading refuses what cannot work, before the weights load, and never passes on unsafe advice
(issue 18, items 2 and 10)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from core.errors import UnsupportedModelError, UserError, quote_error
from core.models import load_model
from tests.conftest import build_tiny_model
from tests.core.test_cli import one_line_error, run_cli

# ---------------------------------------------------------------- encoders are not causal LMs


@pytest.fixture
def bert_folder(tmp_path, demo_tokenizer):
    folder = tmp_path / "tiny-bert"
    config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=demo_tokenizer.vocab_size)
    tf.BertModel(config).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def weights_never_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the weights were loaded before the architecture was checked")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", fail)


def test_encoder_with_weights_is_refused_before_loading(bert_folder, weights_never_load):
    with pytest.raises(UnsupportedModelError, match=r"BertModel.*not a causal language model.*LLaMA"):
        load_model(str(bert_folder))


@pytest.mark.parametrize("architectures", [None, ["BertForMaskedLM"]])
def test_encoder_config_without_a_causal_head_is_refused(bert_folder, weights_never_load, architectures):
    config = json.loads((bert_folder / "config.json").read_text())
    config.pop("architectures", None)
    if architectures:
        config["architectures"] = architectures
    (bert_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        load_model(str(bert_folder))


def test_decoder_configs_without_architectures_still_load(tmp_path, demo_tokenizer):
    folder = tmp_path / "tiny"
    build_tiny_model("opt").save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not load_model(str(folder)).quantized


def test_quantize_refuses_an_encoder_in_one_line(capsys, tmp_path, bert_folder, weights_never_load):
    capsys.readouterr()  # the fixture's own save_pretrained output
    code, _, err = run_cli(capsys, "quantize", bert_folder, "--output", tmp_path / "out", "--samples", "1",
                           "--seqlen", "16")
    assert code == 2 and "not a causal language model" in one_line_error(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- never quote "weights_only=False"

TORCH_REFUSAL = (
    "Weights only load failed. This file can still be loaded, to do so you have two options, \x1b[1mdo those "
    "steps only if you trust the source of the checkpoint\x1b[0m. \n\t(1) In PyTorch 2.6, we changed the default "
    "value of the `weights_only` argument in `torch.load` from `False` to `True`. Re-running `torch.load` with "
    "`weights_only` set to `False` will likely succeed, but it can result in arbitrary code execution. Do it only "
    "if you got the file from a trusted source.\n\t(2) Alternatively, to load with `weights_only=True` please "
    "check the recommended steps in the following error message.\n\tWeightsUnpickler error: Unsupported global: "
    "GLOBAL __main__.Evil was not an allowed global by default. Please use `torch.serialization.add_safe_globals("
    "[__main__.Evil])` or the `torch.serialization.safe_globals([__main__.Evil])` context manager to allowlist "
    "this global if you trust this class/function.\n\nCheck the documentation of torch.load to learn more.")
UNSAFE_WORDS = ("weights_only", "safe_globals", "trust", "\x1b", "arbitrary code")


def _assert_safe(text: str) -> None:
    for word in UNSAFE_WORDS:
        assert word not in text, (word, text)


def test_quoted_torch_refusal_keeps_the_global_and_drops_the_advice():
    quoted = quote_error(RuntimeError(TORCH_REFUSAL))
    assert quoted == "Unsupported global: GLOBAL __main__.Evil"
    first_part = TORCH_REFUSAL.split("\n\tWeightsUnpickler")[0]
    quoted = quote_error(RuntimeError(first_part))
    _assert_safe(quoted)
    assert quoted.startswith("Weights only load failed.")


class Evil:
    """Unpickling an instance would import this test module: code a weights file must never run."""


def test_pickled_weights_that_need_code_are_refused_without_unsafe_advice(tmp_path, demo_tokenizer):
    folder = tmp_path / "bin-model"
    model = build_tiny_model("llama")
    model.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "evil": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert "never runs code" in message and "Evil" in message and ".safetensors" in message
    _assert_safe(message)


def test_original_checkpoint_refusal_has_no_unsafe_advice(tmp_path):
    from core.interop.original_pt import read_original_state

    torch.save({"layer.qweight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refuses to unpickle code") as info:
        read_original_state(tmp_path / "evil.pt")
    _assert_safe(str(info.value).replace("in an environment you trust", ""))
