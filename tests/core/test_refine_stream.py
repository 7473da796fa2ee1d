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
    streamed = _streamed_hessians(tmp_path / "m", windows, 1, tmp_path / "spill")
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

    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    # a 256-token vocabulary: the block, not the loss's logits at the top, makes the peak
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=256))
    block = model.model.layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    plain, refined = plan_for(model, 8, 64), plan_for(model, 8, 64, refine=True)
    assert plain.hessians == 0 and "refinement" not in plain.describe()
    assert refined.hessians == 4 * sum(m.in_features ** 2 for m in linears)  # float32 in x in per projection
    assert refined.quantize > plain.quantize  # refinement's temporaries outweigh k-means's
    assert refined.cpu_peak >= plain.cpu_peak + refined.hessians
    assert "refinement's H" in refined.describe()


# ---------------------------------------------------------------- channel groups (QuantConfig.refine_groups)

def _recorded_hessians(model, windows: torch.Tensor, linears: dict, groups: int) -> dict[str, torch.Tensor]:
    """float64 [G, in, in] per layer, straight from its recorded inputs x_t and output gradients: for each
    group g of contiguous output channels, Σ over windows and tokens of s_gt x_t x_tᵀ, s_gt the squared
    gradient averaged over the group's channels (each window's own loss, as the block-major pass)."""
    inputs: dict[str, list] = {name: [] for name in linears}
    grads: dict[str, list] = {name: [] for name in linears}

    def record(name: str):
        def hook(module, args, output):
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            output.register_hook(lambda g: grads[name].append(g.reshape(-1, g.shape[-1]).double()))
        return hook

    handles = [lin.register_forward_hook(record(name)) for name, lin in linears.items()]
    try:
        for n in range(windows.shape[0]):
            ids = windows[n:n + 1]
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name in linears:
        x, g = torch.cat(inputs[name]), torch.cat(grads[name])
        s = g.square().view(g.shape[0], groups, -1).mean(2)
        result[name] = torch.stack([(x * s[:, k:k + 1]).t() @ x for k in range(groups)])
    return result


def _streamed_hessians(folder: Path, windows: torch.Tensor, groups: int, spill: Path) -> dict[str, torch.Tensor]:
    lazy = LazyModel.open(folder)
    passer = BlockMajorPass(lazy, windows, torch.device("cpu"), ActivationStore(1 << 30, spill))
    passer.prepare()
    run_to_end(passer.forward_sweep(len(lazy.blocks)))
    grads = run_to_end(passer.top_gradients())
    streamed: dict[str, torch.Tensor] = {}
    for i in reversed(range(len(lazy.blocks))):
        block = lazy.load_block(i)
        _, grads = passer.backward_block(block, i, grads, need_input_grad=i > 0, hessians=streamed,
                                         hessian_groups=groups)
        lazy.release(block)
    return streamed


def test_two_groups_of_hessians_equal_a_direct_computation_and_refine_each_half(tmp_path):
    from core.quantize import quantize_matrix
    from core.refine import decode, refine_matrix, row_objective, sparse_mask_of

    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(2))
    linears = quantizable_linears(model)
    expected = _recorded_hessians(model, windows, linears, groups=2)
    streamed = _streamed_hessians(tmp_path / "m", windows, 2, tmp_path / "spill")
    assert set(streamed) == set(expected)
    for name, ref in expected.items():
        assert streamed[name].shape == (2, linears[name].in_features, linears[name].in_features)
        rel = float((streamed[name].double() - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-4, (name, rel)
        assert not torch.allclose(ref[0], ref[1], rtol=0.05)  # the two halves are weighted differently
    # refinement under the two H: each half of the rows is scored by its own H, and never gets worse
    name = next(n for n in linears if n.endswith("down_proj"))
    w = linears[name].weight.detach()
    q = quantize_matrix(w, torch.ones_like(w), 3, threshold=None, sensitivity_percent=0.0)
    refined, stats = refine_matrix(w, None, q, streamed[name])
    assert stats.objective_after < stats.objective_before
    half = w.shape[0] // 2
    dense = ~sparse_mask_of(q, tuple(w.shape))

    def grouped(matrix) -> float:
        error = (w - decode(matrix.lookup_table, matrix.codes)) * dense
        return sum(float(row_objective(error[k * half:(k + 1) * half], streamed[name][k]).sum()) for k in range(2))

    assert grouped(q) == pytest.approx(stats.objective_before, rel=1e-4)
    assert grouped(refined) == pytest.approx(stats.objective_after, rel=1e-4)


def test_refined_codes_of_a_grouped_run_pack_and_load_bit_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    from core.layers import squeeze_linear_from_state
    from core.packing import unpack_codes
    from core.quantize import quantize_matrix, squeeze_module
    from core.refine import refine_matrix

    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    windows = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    streamed = _streamed_hessians(tmp_path / "m", windows, 4, tmp_path / "spill")
    name, lin = next((n, m) for n, m in quantizable_linears(model).items() if n.endswith("gate_proj"))
    w = lin.weight.detach()
    q = quantize_matrix(w, torch.rand_like(w), 3, threshold=2.0, sensitivity_percent=0.5)
    refined, stats = refine_matrix(w, None, q, streamed[name])
    assert stats.objective_after <= stats.objective_before
    module = squeeze_module(refined, 3, lin)
    save_file(module.state_dict(), tmp_path / "m.safetensors")
    state = {f"m.{k}": v for k, v in load_file(tmp_path / "m.safetensors").items()}
    loaded = squeeze_linear_from_state("m", state, lin.in_features)
    assert torch.equal(unpack_codes(loaded.qweight, 3, lin.in_features), refined.codes)
    assert torch.equal(loaded.lookup_table, refined.lookup_table)
    assert torch.equal(loaded.dequantize(), module.dequantize())


def _events_and_report(job: QuantizeJob):
    events, gen = [], run_quantize_job(job)
    try:
        while True:
            events.append(next(gen).message)
    except StopIteration as stop:
        return events, stop.value


def test_a_grouped_run_never_reuses_one_group_hessians(tiny_folder, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from core.checkpoint import load_quantized, read_quantization_config
    from core.cli import main

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    fisher_dir = tmp_path / "cache" / "fisher"
    run_to_end(run_quantize_job(_job(tiny_folder, tmp_path / "g1", QuantConfig(bits=3, refine=True))))
    events, report = _events_and_report(_job(tiny_folder, tmp_path / "g2", QuantConfig(
        bits=3, refine=True, refine_groups=2)))
    assert "sensitivity: from the cache" not in events  # the one-group H does not serve two groups
    one = load_file(next(fisher_dir.glob("*-hessians/block-00000.safetensors")))
    two = load_file(next(fisher_dir.glob("*-hessians-g2/block-00000.safetensors")))
    assert set(one) == set(two)
    for name, h in two.items():
        assert h.shape == (2, *one[name].shape) and one[name].dim() == 2
        # the two groups' H add up to twice the one-group H (the mean over all channels is the groups' mean)
        torch.testing.assert_close(h.sum(0), 2 * one[name], rtol=1e-4, atol=1e-6 * float(one[name].abs().max()))
    for layer in report.layers:
        before, after = layer.refine_objective
        assert after <= before, layer.name
    assert read_quantization_config(tmp_path / "g2")["config"]["refine_groups"] == 2
    assert main(["info", str(tmp_path / "g2")]) == 0
    assert "refined (lnq, 2 channel groups)" in capsys.readouterr().out
    loaded = load_quantized(tmp_path / "g2").model
    assert torch.isfinite(loaded(torch.randint(0, 1000, (1, 16))).logits).all()
    events, _ = _events_and_report(_job(tiny_folder, tmp_path / "g2-again", QuantConfig(
        bits=4, refine=True, refine_groups=2)))
    assert "sensitivity: from the cache" in events  # the same groups: H from the cache


def test_cli_refine_groups_flag():
    from core.cli import build_parser, quant_config_from
    from core.config import from_dict, to_dict

    args = build_parser().parse_args(["quantize", "demo", "--refine", "lnq", "--refine-groups", "4", "--output", "x"])
    config = quant_config_from(args)
    assert config.refine is True and config.refine_groups == 4
    assert from_dict(QuantConfig, to_dict(config)) == config
    assert quant_config_from(_args(refine="lnq")).refine_groups == 1
    with pytest.raises(ValueError, match="--refine lnq"):
        quant_config_from(_args(refine="none", refine_groups=2))
    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match=f"--refine-groups {bad} is not supported"):
            quant_config_from(_args(refine="lnq", refine_groups=bad))


@pytest.mark.parametrize("value, says", [("0", "--refine-groups 0 is not supported"),
                                         ("-1", "--refine-groups -1 is not supported"),
                                         ("3", "do not divide the 64 output rows of model.layers.0.self_attn.q_proj"),
                                         ("2", "add --refine lnq")])
def test_bad_refine_groups_exit_2_with_one_line(tiny_folder, tmp_path, monkeypatch, capsys, value, says):
    from core.cli import main

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    refine = "none" if value == "2" else "lnq"
    code = main(["-q", "quantize", str(tiny_folder), "--bits", "3", "--refine", refine, "--refine-groups", value,
                 "--samples", "2", "--seqlen", "32", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_config_refuses_refine_groups_out_of_range():
    for bad in (0, -2, 65, 2.0, True):
        with pytest.raises(ValueError, match="refine groups"):
            QuantConfig(refine=True, refine_groups=bad)
    assert QuantConfig(refine_groups=8).refine_groups == 8


def test_the_memory_plan_counts_one_hessian_per_group():
    from core.memory_plan import plan_for

    model = build_tiny_model("llama")
    linears = [m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    one, four = plan_for(model, 8, 64, refine=True), plan_for(model, 8, 64, refine=True, refine_groups=4)
    assert four.hessians == 4 * one.hessians == 4 * 4 * sum(m.in_features ** 2 for m in linears)
    # the block phase grows by the added H (the peak is the largest phase: here the logits at the top may lead)
    block_phase = (lambda p: p.block + p.window + p.quantize + p.outlier_stats + p.hessians)
    assert block_phase(four) - block_phase(one) == 3 * one.hessians
    assert four.cpu_peak >= one.cpu_peak
    assert plan_for(model, 8, 64, refine_groups=4).hessians == 0  # groups without refinement: nothing
