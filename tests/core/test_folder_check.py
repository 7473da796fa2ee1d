"""A quantized folder whose config.json and weights disagree is one line naming the folder and the first
difference, for loading and for 'squeeze info'; single-file and sharded folders (issue 18, item 3)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import load_quantized, save_quantized
from core.config import QuantConfig
from core.errors import UserError
from core.folder_check import check_quantized_folder, expected_shapes, quantized_skeleton, stored_shapes
from core.progress import run_to_end
from core.quantize import quantize_model
from tests.conftest import build_tiny_model
from tests.core.test_cli import one_line_error, run_cli

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, demo_dir):
    from transformers import AutoTokenizer

    model = build_tiny_model("llama")
    fisher = {n: torch.rand(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "layers" in n}
    run_to_end(quantize_model(model, QuantConfig(bits=3, sensitivity_percent=1.0), fisher))
    out = tmp_path_factory.mktemp("saved") / "q"
    return run_to_end(save_quantized(model, AutoTokenizer.from_pretrained(demo_dir), out, {"config": {"bits": 3}}))


@pytest.fixture
def folder(tmp_path, saved_folder):
    return shutil.copytree(saved_folder, tmp_path / "q")


def _edit_layout(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules"][LAYER].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _shard(folder, drop: str | None = None):
    """Rewrite model.safetensors as two shards with an index (dropping tensor ``drop``)."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = [k for k in sorted(state) if k != drop]
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_an_intact_folder_passes_and_every_tensor_is_expected(folder):
    block = check_quantized_folder(folder)
    assert len(block["modules"]) == 14
    stored = stored_shapes(folder)
    expected = expected_shapes(quantized_skeleton(folder, block))
    assert {k: v[0] for k, v in stored.items()} == expected


def test_bits_changed_in_config_json_is_one_line_naming_the_tensor_and_shapes(folder, capsys):
    _edit_layout(folder, bits=4)  # the weights are 3-bit: qweight has 6 rows for 64 inputs, 4 bits want 8
    with pytest.raises(UserError) as info:
        load_quantized(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    assert f"{LAYER}.qweight is [6, 64]" in message and "implies [8, 64]" in message
    code, _, err = run_cli(capsys, "info", folder)
    assert code == 2 and f"{LAYER}.qweight" in one_line_error(err)


def test_info_reports_a_layer_claiming_seven_bits_as_broken(folder, capsys):
    _edit_layout(folder, bits=7)
    code, out, err = run_cli(capsys, "info", folder)
    assert code == 2 and out == ""
    line = one_line_error(err)
    assert "cannot exist" in line and LAYER in line and "quantize the model again" in line
    with pytest.raises(UserError, match="cannot exist"):
        load_quantized(folder)


def test_info_reports_a_missing_layer_tensor(folder, capsys):
    state = load_file(folder / "model.safetensors")
    del state[f"{LAYER}.sparse_vals"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "info", folder)
    assert code == 2 and f"{LAYER}.sparse_vals" in one_line_error(err) and "missing" in err


def test_a_sparse_count_edited_in_config_json_is_caught(folder):
    nnz = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"][LAYER]["nnz"]
    _edit_layout(folder, nnz=nnz + 1)
    with pytest.raises(UserError, match=rf"{LAYER}.sparse_cols is \[{nnz}\].*implies \[{nnz + 1}\]"):
        check_quantized_folder(folder)


def test_sharded_folders_are_checked_from_their_index(folder, capsys):
    _shard(folder)
    check_quantized_folder(folder)
    code, out, _ = run_cli(capsys, "info", folder)
    assert code == 0 and "14 quantized" in out


def test_a_sharded_folder_missing_a_tensor_or_a_shard_is_broken(tmp_path, saved_folder):
    broken = shutil.copytree(saved_folder, tmp_path / "a")
    _shard(broken, drop=f"{LAYER}.lookup_table")
    with pytest.raises(UserError, match=f"{LAYER}.lookup_table .* is missing"):
        check_quantized_folder(broken)
    lost = shutil.copytree(saved_folder, tmp_path / "b")
    _shard(lost)
    (lost / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="lacks its weight file model-00002-of-00002.safetensors"):
        check_quantized_folder(lost)


def test_tensors_of_an_imported_layer_that_do_not_fit_are_one_line():
    from core.layers import SqueezeLinear, squeeze_linear_from_state

    module = SqueezeLinear.from_parts(torch.randint(0, 16, (8, 64), dtype=torch.uint8), torch.randn(8, 16), 4)
    state = dict(module.state_dict(), lookup_table=torch.randn(8, 8).half(), sparse_rows=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(UserError) as info:
        squeeze_linear_from_state("layer", {f"layer.{k}": v for k, v in state.items()}, 64)
    assert "\n" not in str(info.value) and "size mismatch for" in str(info.value)
