"""bench.streaming: the random bf16 folders load, a worker reports its peaks and stage times, the guard
stops a worker that would take too much memory, and the targets are judged from the numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import big_models, streaming, streaming_report

ROOT = Path(__file__).resolve().parents[2]
MICRO = ("llama-micro-random-bf16", {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "tie_word_embeddings": False})


@pytest.fixture
def micro_folder(tmp_path, monkeypatch, demo_dir):
    monkeypatch.setitem(big_models.SHAPES, "micro", MICRO)
    return big_models.random_folder("micro", tmp_path, log=lambda _: None)


def test_folder_is_a_standard_sharded_bf16_llama(micro_folder):
    import torch
    from transformers import AutoModelForCausalLM

    index = json.loads((micro_folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert not micro_folder.with_name(micro_folder.name + ".partial").exists()
    model, info = AutoModelForCausalLM.from_pretrained(micro_folder, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert 0.018 < model.model.layers[1].mlp.up_proj.weight.float().std().item() < 0.022
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert big_models.folder_parameters(micro_folder) == sum(p.numel() for p in model.parameters())


def test_whole_worker_reports_peaks_and_stage_times(micro_folder, tmp_path):
    out = tmp_path / "q"
    done = subprocess.run([sys.executable, "-m", "bench.streaming", "--worker", "whole", str(micro_folder), str(out),
                           "--samples", "2", "--seqlen", "32"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 100 < result["peak_rss_anon_mib"] <= result["peak_vm_rss_mib"] <= result["vm_hwm_mib"] + 1
    assert {"load", "fisher", "quantize", "save", "total"} <= set(result["seconds"])
    assert result["seconds_per_window"] == pytest.approx(result["seconds"]["fisher"] / 2)
    assert (out / "config.json").is_file()


def test_a_worker_past_the_memory_cap_is_stopped(micro_folder, tmp_path):
    row = streaming.run_worker("whole", str(micro_folder), tmp_path, samples=1, seqlen=32, cap=1)
    assert row["stopped"].startswith("stopped: RssAnon passed")
    assert not list(tmp_path.glob("streaming-run-*"))  # its cache and output are removed


def _row(label, parameters, block, anon_gb, hwm_gb, seconds, per_window):
    anon = anon_gb * 1e9 / 2**20
    return {"label": label, "mode": "stream", "parameters": parameters, "block_parameters": block,
            "peak_rss_anon_mib": anon, "peak_vm_rss_mib": hwm_gb * 1e9 / 2**20, "vm_hwm_mib": hwm_gb * 1e9 / 2**20,
            "bytes_per_parameter": anon * 2**20 / parameters, "seconds": seconds, "seconds_per_window": per_window,
            "samples": 4, "seqlen": 512, "run": "now"}


def test_targets_are_judged_from_the_numbers():
    small = _row("1.1B", 1.17e9, 44e6, 2.0, 4.0, {"split": 10.0, "save": 5.0, "forward": 8, "total": 30}, 5.0)
    whole = dict(small, mode="whole", seconds_per_window=4.5)
    good = _row("8B", 7.38e9, 218e6, 5.0, 12.0, {"split": 70.0, "save": 33.0, "forward": 50, "total": 200}, 30.0)
    half = dict(small, parameters=0.69e9, peak_rss_anon_mib=1.8e9 / 2**20, size="1.1b-11")
    results = {"1.1b/whole": whole, "1.1b/stream": small, "8b/stream": good, "1.1b-11/stream": half}
    text = streaming_report.markdown(results, machine="_m_", latest="now", mem_total=24 * 2**30, quick=False)
    assert "10 GB and VmHWM under 16 GB: **met** (5.00 GB RssAnon, 12.00 GB VmHWM)" in text
    assert "1.3x of the whole-model path at 1.1B: **met** (5.0 s against 4.5 s: 1.11x)" in text
    assert "not with the model" in text and "**met** (grew 191 MiB for 0.48 B added parameters" in text
    assert "1.1B to 8B: split 1.11x, save 1.05x" in text  # forward is the calibration pass: not judged
    assert "The whole-model path is not run at 8B (89 GB)" in text

    slow = dict(good, peak_rss_anon_mib=20e9 / 2**20, bytes_per_parameter=20e9 / 7.38e9,
                seconds={"split": 400.0, "save": 33.0, "forward": 50, "total": 500})
    text = streaming_report.markdown({**results, "8b/stream": slow}, machine="_m_", latest="now",
                                     mem_total=24 * 2**30, quick=False)
    assert "VmHWM under 16 GB: **not met** (20.00 GB RssAnon" in text
    deeper = dict(half, peak_rss_anon_mib=1.2e9 / 2**20)  # 0.8 GB more for 0.48 B added parameters
    text = streaming_report.markdown({**results, "8b/stream": slow, "1.1b-11/stream": deeper}, machine="_m_",
                                     latest="now", mem_total=24 * 2**30, quick=False)
    assert "by ~600%): **not met** (grew 763 MiB" in text
    assert "**not met** (1.1B to 8B: split 6.34x" in text
    stopped = streaming_report.markdown({"8b/stream": {"label": "8B", "mode": "stream", "parameters": 7.38e9,
                                                       "stopped": "stopped: RssAnon passed 19.0 GiB"}},
                                        machine="_m_", latest="now", mem_total=24 * 2**30, quick=False)
    assert "**not met** (stopped: RssAnon passed 19.0 GiB)" in stopped
