"""Refinement in the streaming engine: H from the block-major backward, its cache, the config and the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_model
from core.activation_store import ActivationStore
from core.block_pass import BlockMajorPass
from core.config import CalibrationConfig, QuantConfig
from core.lazy_model import LazyModel
from core.models import quantizable_linears
from core.pipeline import QuantizeJob, run_quantize_job
from core.progress import run_to_end
from core.refine import GradientHessians
from core.sensitivity import compute_fisher


def test_block_major_hessians_equal_the_whole_model_ones(tmp_path):
    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    linears = quantizable_linears(model)
    with GradientHessians(linears) as rec:
        run_to_end(compute_fisher(model, windows, linears))
    lazy = LazyModel.open(tmp_path / "m")
    passer = BlockMajorPass(lazy, windows, torch.device("cpu"), ActivationStore(1 << 30, tmp_path / "spill"))
    passer.prepare()
    run_to_end(passer.forward_sweep(len(lazy.blocks)))
    grads = run_to_end(passer.top_gradients())
    streamed: dict[str, torch.Tensor] = {}
    for i in reversed(range(len(lazy.blocks))):
        block = lazy.load_block(i)
        fisher, grads = passer.backward_block(block, i, grads, need_input_grad=i > 0, hessians=streamed)
        lazy.release(block)
    assert set(streamed) == set(rec.hessians)
    for name, ref in rec.hessians.items():
        rel = float((streamed[name] - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-4, (name, rel)


def test_without_refinement_no_hessian_is_kept(tmp_path):
    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    windows = torch.randint(0, 1000, (1, 16))
    lazy = LazyModel.open(tmp_path / "m")
    passer = BlockMajorPass(lazy, windows, torch.device("cpu"), ActivationStore(1 << 30, tmp_path / "spill"))
    passer.prepare()
    run_to_end(passer.forward_sweep(len(lazy.blocks)))
    grads = run_to_end(passer.top_gradients())
    block = lazy.load_block(1)
    fisher, _ = passer.backward_block(block, 1, grads)
    assert all(not lin.weight.requires_grad for lin in block.modules() if isinstance(lin, torch.nn.Linear))
    assert len(fisher) == 7


@pytest.fixture
def tiny_folder(tmp_path, demo_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


CAL = CalibrationConfig(samples=3, seqlen=64)


def _job(folder: Path, output: Path, config: QuantConfig) -> QuantizeJob:
    return QuantizeJob(model=str(folder), output=output, config=config, calibration=CAL, device="cpu")


def test_a_refined_run_writes_a_loadable_folder_and_reuses_the_cached_hessians(tiny_folder, tmp_path, monkeypatch,
                                                                              capsys):
    from core.checkpoint import load_quantized, read_quantization_config
    from core.cli import main

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    plain = run_to_end(run_quantize_job(_job(tiny_folder, tmp_path / "plain", QuantConfig(bits=3))))
    assert all(layer.refine_objective is None for layer in plain.layers) and "refine" not in plain.seconds
    assert not list((tmp_path / "cache" / "fisher").glob("*-hessians"))  # refinement off: no H kept
    report = run_to_end(run_quantize_job(_job(tiny_folder, tmp_path / "refined", QuantConfig(bits=3, refine=True))))
    assert report.seconds["refine"] > 0 and "backward" in report.seconds  # the Fisher alone was not enough
    assert len(list((tmp_path / "cache" / "fisher").glob("*-hessians/block-*.safetensors"))) == 2
    for layer in report.layers:
        before, after = layer.refine_objective
        assert after <= before, layer.name
    assert sum(layer.refine_objective[1] for layer in report.layers) < sum(
        layer.refine_objective[0] for layer in report.layers)
    assert read_quantization_config(tmp_path / "refined")["config"]["refine"] is True
    assert main(["info", str(tmp_path / "refined")]) == 0 and "3 bits, refined (lnq)" in capsys.readouterr().out
    loaded = load_quantized(tmp_path / "refined").model
    assert torch.isfinite(loaded(torch.randint(0, 1000, (1, 16))).logits).all()
    job = _job(tiny_folder, tmp_path / "again", QuantConfig(bits=4, refine=True))
    events = []
    gen = run_quantize_job(job)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        again = stop.value
    assert any(e.message == "sensitivity: from the cache" for e in events)
    assert all(layer.refine_objective is not None for layer in again.layers)


def _args(**kw) -> argparse.Namespace:
    base = dict(bits=3, target_bits=None, outlier_range=None, outlier_percent=None, sensitivity=0.05,
                method="squeezellm", refine=None)
    return argparse.Namespace(**{**base, **kw})


def test_cli_refine_flag():
    from core.cli import build_parser, quant_config_from

    assert quant_config_from(_args(refine="lnq")).refine is True
    assert quant_config_from(_args(refine="none")).refine is False
    assert quant_config_from(_args()).refine is QuantConfig().refine
    with pytest.raises(ValueError, match="--method squeezellm"):
        quant_config_from(_args(refine="lnq", method="rtn"))
    assert quant_config_from(_args(method="rtn")).refine is False
    args = build_parser().parse_args(["quantize", "demo", "--bits", "3", "--refine", "lnq", "--output", "x"])
    assert quant_config_from(args).refine is True


def test_config_refuses_a_refine_that_is_not_a_flag():
    with pytest.raises(ValueError, match="true or false"):
        QuantConfig(refine="yes")


def test_the_memory_plan_counts_the_hessians_of_a_block_when_refining():
    from core.memory_plan import plan_for

    model = build_tiny_model("llama")
    block = model.model.layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    plain, refined = plan_for(model, 8, 64), plan_for(model, 8, 64, refine=True)
    assert plain.hessians == 0 and "refinement" not in plain.describe()
    assert refined.hessians == 4 * sum(m.in_features ** 2 for m in linears)  # float32 in x in per projection
    assert refined.quantize > plain.quantize  # refinement's temporaries outweigh k-means's
    assert refined.cpu_peak >= plain.cpu_peak + refined.hessians
    assert "refinement's H" in refined.describe()
