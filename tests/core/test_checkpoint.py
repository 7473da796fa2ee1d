import json

import pytest
import torch

from core.checkpoint import is_quantized_folder, load_quantized, save_quantized
from core.config import QuantConfig
from core.errors import UserError
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import build_tiny_model


@pytest.fixture
def quantized_tiny(demo_tokenizer):
    model = build_tiny_model("llama")
    run_to_end(quantize_model(model, QuantConfig(bits=3, sensitivity_percent=1.0),
                              {n: torch.rand(m.weight.shape) for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and "layers" in n}))
    return model, demo_tokenizer


def test_save_then_load_is_bit_exact(tmp_path, quantized_tiny):
    model, tok = quantized_tiny
    out = run_to_end(save_quantized(model, tok, tmp_path / "q", {"note": "test"}))
    assert is_quantized_folder(out)
    loaded = load_quantized(out)
    a, b = model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    assert loaded.quantized and loaded.tokenizer("hello")["input_ids"] == tok("hello")["input_ids"]
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "squeezellm" and block["format_version"] == 1 and len(block["modules"]) == 14


def test_cancelled_save_leaves_nothing(tmp_path, quantized_tiny):
    model, tok = quantized_tiny
    gen = save_quantized(model, tok, tmp_path / "q", {})
    next(gen)
    next(gen)
    gen.close()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, quantized_tiny):
    model, tok = quantized_tiny
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        run_to_end(save_quantized(model, tok, tmp_path / "q", {}))
    assert (tmp_path / "q" / "keep.txt").read_text() == "mine"
    run_to_end(save_quantized(model, tok, tmp_path / "q", {}, overwrite=True))
    assert is_quantized_folder(tmp_path / "q") and not (tmp_path / "q" / "keep.txt").exists()


def test_corrupt_or_foreign_folders_give_clear_errors(tmp_path, quantized_tiny):
    model, tok = quantized_tiny
    out = run_to_end(save_quantized(model, tok, tmp_path / "q", {}))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        load_quantized(out)
    with pytest.raises(UserError, match="config.json"):
        load_quantized(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="newer"):
        load_quantized(out)
