"""Per-layer mixed precision (SPEC H.9): one of two widths per matrix under an average-bits budget."""

import json
import random

import pytest
import torch

from core.config import OutlierConfig, QuantConfig, from_dict, mixed_widths, to_dict
from core.layers import SqueezeLinear
from core.mixed_precision import allocate_bits, average_bits
from core.models import quantizable_linears
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import build_tiny_model
from tests.core.test_cli import one_line_error, run_cli, text_file, tiny_folder  # noqa: F401 (fixtures)

SETTING = dict(outliers=OutlierConfig(percent=0.5), sensitivity_percent=0.5)


def tiny_fisher(model, scale: dict[str, float] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(lin.weight.shape, generator=g) ** 4 * (scale or {}).get(name, 1.0)
            for name, lin in quantizable_linears(model).items()}


def quantized(config: QuantConfig, scale: dict[str, float] | None = None):
    model = build_tiny_model("llama")
    events = []
    report = run_to_end(quantize_model(model, config, tiny_fisher(model, scale)), events.append)
    return model, report, events


def numel_of(report) -> dict[str, int]:
    return {layer.name: layer.numel for layer in report.layers}


# ---- the allocation -------------------------------------------------------------------------------

def test_budget_goes_to_the_largest_gain_per_extra_bit():
    numel = {"a": 100, "b": 100, "c": 300, "d": 100}
    # gain per weight: a 0.1, b 0.5, c 0.2 (largest total gain, but per bit below b), d 0.0
    errors = {"a": {3: 20.0, 4: 10.0}, "b": {3: 60.0, 4: 10.0}, "c": {3: 70.0, 4: 10.0}, "d": {3: 5.0, 4: 5.0}}
    total = sum(numel.values())  # + 0.5: a float target just below a matrix's exact cost leaves it out
    assert allocate_bits(numel, errors, 3 + 100.5 / total) == {"a": 3, "b": 4, "c": 3, "d": 3}
    assert allocate_bits(numel, errors, 3 + 400.5 / total) == {"a": 3, "b": 4, "c": 4, "d": 3}
    # c no longer fits after b: the leftover goes on down the list to a, which does
    assert allocate_bits(numel, errors, 3 + 250.5 / total) == {"a": 4, "b": 4, "c": 3, "d": 3}
    assert allocate_bits(numel, errors, 3.0) == dict.fromkeys(numel, 3)
    assert allocate_bits(numel, errors, 4.0) == dict.fromkeys(numel, 4)


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_never_exceeded_and_nothing_more_fits(seed):
    rng = random.Random(seed)
    numel = {f"m{i}": rng.choice((64, 576 * 64, 576 * 576, 1536 * 576)) for i in range(rng.randint(1, 30))}
    errors = {n: {3: (e := rng.random()) * 8, 4: e * rng.random()} for n in numel}
    target = rng.choice((3.0, 4.0, round(rng.uniform(3, 4), 3), 3 + rng.random()))
    chosen = allocate_bits(numel, errors, target)
    spent = sum(bits * numel[n] for n, bits in chosen.items())
    assert spent <= target * sum(numel.values())
    leftover = target * sum(numel.values()) - spent
    assert all(numel[n] > leftover - 1e-6 for n, bits in chosen.items() if bits == 3)
    assert average_bits(numel, chosen) <= target


def test_target_outside_3_to_6_is_refused():
    for target in (2.5, 6.5):
        with pytest.raises(ValueError, match="3.5"):
            allocate_bits({"a": 1}, {"a": {3: 1.0, 4: 0.0}}, target)


@pytest.mark.parametrize("target,widths", [(3.0, (3, 4)), (3.5, (3, 4)), (4.0, (3, 4)), (4.01, (4, 5)),
                                           (4.6, (4, 5)), (5.0, (4, 5)), (5.5, (5, 6)), (6.0, (5, 6))])
def test_a_target_chooses_between_the_two_whole_widths_around_it(target, widths):
    assert mixed_widths(target) == widths == QuantConfig(target_bits=target).widths


def test_wider_budgets_go_to_the_largest_gain_between_their_own_widths():
    numel = {"a": 100, "b": 100, "c": 100}
    errors = {"a": {4: 8.0, 5: 2.0}, "b": {4: 9.0, 5: 1.0}, "c": {4: 1.0, 5: 0.9}}
    chosen = allocate_bits(numel, errors, 4 + 200.5 / 300)
    assert chosen == {"a": 5, "b": 5, "c": 4} and average_bits(numel, chosen) <= 4 + 200.5 / 300


# ---- the config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,words", [
    (dict(target_bits=2.5), "such as 3.5"),
    (dict(target_bits=6.5), "such as 3.5"),
    (dict(target_bits=float("nan")), "such as 3.5"),
    (dict(target_bits=3.5, method="rtn"), "needs method squeezellm"),
    (dict(target_bits="3.5"), "not a number"),
])
def test_bad_targets_say_what_to_do(kwargs, words):
    with pytest.raises(ValueError, match=words):
        QuantConfig(**kwargs)


def test_target_round_trips_and_old_configs_still_load():
    config = QuantConfig(target_bits=3.25, **SETTING)
    assert from_dict(QuantConfig, json.loads(json.dumps(to_dict(config)))) == config
    old = to_dict(QuantConfig(bits=3))
    del old["target_bits"]
    assert from_dict(QuantConfig, old) == QuantConfig(bits=3) and not QuantConfig(bits=3).mixed_precision


# ---- whole models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs():
    """The tiny llama quantized all-3-bit, all-4-bit and at target 3.5 (same Fisher, same setting)."""
    return {key: quantized(config) for key, config in {
        3: QuantConfig(bits=3, **SETTING), 4: QuantConfig(bits=4, **SETTING),
        3.5: QuantConfig(target_bits=3.5, **SETTING)}.items()}


def test_target_is_met_and_not_exceeded(runs):
    model, report, events = runs[3.5]
    numel = numel_of(report)
    assert report.dense_bits <= 3.5
    smallest_at_3 = min(n for name, n in numel.items() if report.layer_bits[name] == 3)
    assert 3.5 * sum(numel.values()) - report.dense_bits * sum(numel.values()) < smallest_at_3
    assert set(report.matrices_per_bits) == {3, 4}
    for name, bits in report.layer_bits.items():
        assert model.get_submodule(name).bits == bits
    assert {e.stage for e in events} >= {"outliers", "quantize", "allocate"}
    assert "k-means at 3 and 4 bits" in next(e.message for e in events if e.stage == "quantize")
    # bits per weight (every stored bit) between the two single widths
    assert runs[3][1].bits_per_weight < report.bits_per_weight < runs[4][1].bits_per_weight


def test_weighted_error_lies_between_the_single_widths(runs):
    total = {key: sum(layer.weighted_error for layer in report.layers) for key, (_, report, _) in runs.items()}
    assert total[4] < total[3.5] < total[3]
    for layer, three, four in zip(*(runs[k][1].layers for k in (3.5, 3, 4))):
        assert dict(layer.weighted_errors) == {3: three.weighted_error, 4: four.weighted_error}


@pytest.mark.parametrize("target,bits", [(3.0, 3), (4.0, 4)])
def test_end_targets_equal_single_width_runs(runs, target, bits):
    model, report, _ = quantized(QuantConfig(target_bits=target, **SETTING))
    single_model, single, _ = runs[bits]
    assert report.matrices_per_bits == {bits: len(report.layers)}
    a, b = model.state_dict(), single_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report.quantized_bytes == single.quantized_bytes


def test_the_most_sensitive_matrices_get_4_bits():
    model = build_tiny_model("llama")
    names = list(quantizable_linears(model))
    sensitive = [n for n in names if n.endswith(("o_proj", "up_proj"))]
    numel = {n: lin.weight.numel() for n, lin in quantizable_linears(model).items()}
    target = 3 + (sum(numel[n] for n in sensitive) + 0.5) / sum(numel.values())
    _, report, _ = quantized(QuantConfig(target_bits=target, **SETTING), dict.fromkeys(sensitive, 1e4))
    assert sorted(n for n, bits in report.layer_bits.items() if bits == 4) == sorted(sensitive)


def test_mixed_folder_saves_and_loads_bit_exact(runs, tmp_path, demo_tokenizer):
    from core.checkpoint import load_quantized, read_quantization_config, save_quantized

    model, report, _ = runs[3.5]
    settings = {"config": report.config}
    out = run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "mixed", settings))
    block = read_quantization_config(out)
    assert block["format_version"] == 1
    assert block["bits_overrides"] == {n: 3 for n, bits in report.layer_bits.items() if bits == 3}
    loaded = load_quantized(out).model
    for name, bits in report.layer_bits.items():
        module = loaded.get_submodule(name)
        assert isinstance(module, SqueezeLinear) and module.bits == bits
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_target_above_4_mixes_4_and_5_bits_and_round_trips(runs, tmp_path, demo_tokenizer):
    from core.checkpoint import load_quantized, save_quantized

    model, report, events = quantized(QuantConfig(target_bits=4.5, **SETTING))
    assert set(report.matrices_per_bits) == {4, 5} and report.dense_bits <= 4.5
    assert "k-means at 4 and 5 bits" in next(e.message for e in events if e.stage == "quantize")
    error = sum(layer.weighted_error for layer in report.layers)
    assert error < sum(layer.weighted_error for layer in runs[4][1].layers)
    loaded = load_quantized(run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "m45",
                                                      {"config": report.config}))).model
    for name, bits in report.layer_bits.items():
        assert loaded.get_submodule(name).bits == bits
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_each_extra_bit_lowers_every_matrix_error():
    errors = {bits: quantized(QuantConfig(bits=bits, **SETTING))[1].layers for bits in (4, 5, 6)}
    for four, five, six in zip(errors[4], errors[5], errors[6]):
        assert six.weighted_error < five.weighted_error < four.weighted_error, four.name


def test_single_width_folders_carry_no_overrides(runs, tmp_path, demo_tokenizer):
    from core.checkpoint import read_quantization_config, save_quantized

    model, report, _ = runs[3]
    out = run_to_end(save_quantized(model, demo_tokenizer, tmp_path / "q3", {"config": report.config}))
    assert "bits_overrides" not in read_quantization_config(out)


def test_preview_of_a_target_is_between_the_single_widths():
    from core.preview import collect_stats, preview

    model = build_tiny_model("llama")
    stats = run_to_end(collect_stats(model, tiny_fisher(model)))
    size = {key: preview(stats, config, 0, 0).quantized_bytes for key, config in {
        3: QuantConfig(bits=3, **SETTING), 4: QuantConfig(bits=4, **SETTING),
        3.5: QuantConfig(target_bits=3.5, **SETTING)}.items()}
    assert size[3.5] == pytest.approx((size[3] + size[4]) / 2, abs=1)


# ---- the command line -----------------------------------------------------------------------------

def test_cli_quantizes_to_a_target_and_info_shows_the_split(capsys, tmp_path, tiny_folder, text_file):  # noqa: F811
    out = tmp_path / "mixed"
    code, stdout, _ = run_cli(capsys, "quantize", tiny_folder, "--target-bits", "3.5", "--calibration", text_file,
                              "--samples", "2", "--seqlen", "32", "--output", out)
    assert code == 0 and "bits per dense weight (target 3.5)" in stdout
    code, stdout, _ = run_cli(capsys, "info", out)
    method_line = next(line for line in stdout.splitlines() if line.startswith("method"))
    assert code == 0 and "mixed:" in method_line and "at 3 bits" in method_line and "at 4 bits" in method_line


@pytest.mark.parametrize("args,words", [
    (["--bits", "3", "--target-bits", "3.5"], "not allowed with"),
    (["--target-bits", "6.5"], "such as 3.5"),
    (["--target-bits", "3.5", "--method", "rtn"], "squeezellm"),
])
def test_cli_bad_targets_are_one_line_and_exit_2(capsys, tmp_path, tiny_folder, args, words):  # noqa: F811
    code, _, err = run_cli(capsys, "quantize", tiny_folder, *args, "--output", tmp_path / "o")
    assert code == 2 and words in one_line_error(err)
    assert not (tmp_path / "o").exists()
