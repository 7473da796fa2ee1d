"""transformers-native loading: from_pretrained(quantized folder) and save_pretrained round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from core.checkpoint import load_quantized, save_quantized
from core.config import QuantConfig
from core.layers import SqueezeLinear
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, demo_tokenizer):
    model = build_tiny_model("llama")
    run_to_end(quantize_model(model, QuantConfig(bits=3, sensitivity_percent=1.0), None))
    return run_to_end(save_quantized(model, demo_tokenizer, tmp_path_factory.mktemp("q") / "q", {"note": "x"}))


def test_from_pretrained_builds_squeeze_layers_with_identical_logits(quantized):
    import core.interop  # noqa: F401  (registers the squeezellm method)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized)
    layers = [m for m in model.modules() if isinstance(m, SqueezeLinear)]
    assert len(layers) == 14 and all(m.nnz > 0 for m in layers)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared_input is not None and attn.q_proj.shared_input is attn.v_proj.shared_input
    assert model.is_quantized and model.config.quantization_config.quant_method == "squeezellm"
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_quantized(quantized).model(ids).logits)


def test_save_pretrained_writes_a_folder_load_quantized_reads(tmp_path, quantized, demo_tokenizer):
    import core.interop  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized)
    model.save_pretrained(tmp_path / "again")
    demo_tokenizer.save_pretrained(tmp_path / "again")
    block = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert block == json.loads((quantized / "config.json").read_text())["quantization_config"]
    original = load_quantized(quantized).model.state_dict()
    again = load_quantized(tmp_path / "again").model.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_registration_is_idempotent_and_lean():
    code = ("import sys, torch\n"
            "import core.interop\n"
            "from core.interop.hf_quantizer import register_squeezellm\n"
            "register_squeezellm(); register_squeezellm()\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "qt = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'studio', 'pyqtgraph')]\n"
            "print(AUTO_QUANTIZER_MAPPING['squeezellm'].__name__, qt, torch.cuda.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "SqueezeLLMHfQuantizer [] False"
