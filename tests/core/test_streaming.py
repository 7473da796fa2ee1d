"""The streaming engine: block-major Fisher, block-by-block quantization, shards, resume, memory refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_model
from core.activation_store import ActivationStore
from core.block_pass import BlockMajorPass
from core.config import CalibrationConfig, OutlierConfig, QuantConfig
from core.errors import UserError
from core.lazy_model import LazyModel
from core.models import quantizable_linears
from core.pipeline import QuantizeJob, run_quantize_job
from core.progress import run_to_end
from core.sensitivity import compute_fisher

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_fisher_cache(monkeypatch):
    """Every run here computes its Fisher (a cached one would skip the passes under test)."""
    monkeypatch.setenv("SQUEEZE_FISHER_CACHE_GB", "0")


def _save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def block_major_fisher(folder: Path, windows: torch.Tensor, budget: int, spill: Path) -> dict[str, torch.Tensor]:
    lazy = LazyModel.open(folder)
    passer = BlockMajorPass(lazy, windows, torch.device("cpu"), ActivationStore(budget, spill))
    passer.prepare()
    run_to_end(passer.forward_sweep(len(lazy.blocks)))
    grads = run_to_end(passer.top_gradients())
    fisher = {}
    for i in reversed(range(len(lazy.blocks))):
        block = lazy.load_block(i)
        part, grads = passer.backward_block(block, i, grads, need_input_grad=i > 0)
        lazy.release(block)
        fisher.update(part)
    return fisher


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["in-ram", "spilled-to-disk"])
def test_block_major_fisher_equals_whole_model_fisher(tiny_arch, tmp_path, budget):
    model = build_tiny_model(tiny_arch)
    folder = _save(model, tmp_path / "m")
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    whole = run_to_end(compute_fisher(model, windows, quantizable_linears(model)))
    streamed = block_major_fisher(folder, windows, budget, tmp_path / "spill")
    assert set(streamed) == set(whole)
    for name, ref in whole.items():
        rel = float((streamed[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert rel <= 1e-5, (name, rel)
    if budget == 0:
        assert not any((tmp_path / "spill").glob("*.safetensors")), "spilled activations are removed once used"


@pytest.fixture
def tiny_folder(tmp_path, demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return _save(LlamaForCausalLM(config).eval(), tmp_path / "tiny", demo_tokenizer)


@pytest.fixture
def tiny_bf16_folder(tiny_folder, tmp_path, demo_tokenizer):
    """The same model stored in bfloat16 (its outlier statistics are then condensed by counting bit patterns)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16)
    return _save(model, tmp_path / "tiny-bf16", demo_tokenizer)


CAL = CalibrationConfig(samples=3, seqlen=64)


def _quantize(folder: Path, output: Path, config: QuantConfig, **kw):
    job = QuantizeJob(model=str(folder), output=output, config=config, calibration=CAL, device="cpu", **kw)
    return run_to_end(run_quantize_job(job))


@pytest.mark.parametrize("stored", ["tiny_folder", "tiny_bf16_folder"], ids=["float32", "bfloat16"])
def test_streamed_folder_matches_the_whole_model_path(stored, request, tmp_path):
    from core.checkpoint import load_quantized
    from core.data import calibration_windows, corpus_tokens
    from core.models import load_model
    from core.quantize import quantize_model

    tiny_folder = request.getfixturevalue(stored)
    config = QuantConfig(bits=3, outliers=OutlierConfig(percent=0.45), sensitivity_percent=0.05,
                         embed_bits=16, head_bits=16)  # the whole-model path keeps them float16
    report = _quantize(tiny_folder, tmp_path / "q", config)
    loaded = load_model(str(tiny_folder))
    windows = calibration_windows(corpus_tokens(loaded.tokenizer, "builtin"), CAL.samples, CAL.seqlen, CAL.seed)
    fisher = run_to_end(compute_fisher(loaded.model, windows, quantizable_linears(loaded.model)))
    whole = run_to_end(quantize_model(loaded.model, config, fisher))
    assert report.range_multiplier == pytest.approx(whole.range_multiplier)
    assert report.bits_per_weight == pytest.approx(whole.bits_per_weight)
    from core.layers import SqueezeLinear

    streamed = load_quantized(tmp_path / "q").model
    ours = dict(streamed.named_modules())
    layers = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, SqueezeLinear)]
    assert len(layers) == 4 * 7
    for name, module in layers:
        diff = (ours[name].dequantize() - module.dequantize()).abs()
        assert float((diff > 1e-6).float().mean()) < 0.01, name  # equal but for k-means ties
    ids = torch.randint(0, 1000, (1, 32))
    # fp16 embedding/head; a bf16 source keeps its norms and embedding in bf16, and computes in it
    ours_logits, whole_logits = streamed(ids).logits.float(), loaded.model(ids).logits
    assert torch.allclose(ours_logits, whole_logits, atol=2e-3 if stored == "tiny_folder" else 2e-2)


def test_mixed_precision_and_baselines_stream(tiny_folder, tmp_path):
    from core.checkpoint import load_quantized, read_quantization_config

    report = _quantize(tiny_folder, tmp_path / "mixed", QuantConfig(target_bits=3.5))
    assert set(report.matrices_per_bits) == {3, 4} and report.dense_bits <= 3.5
    block = read_quantization_config(tmp_path / "mixed")
    assert block["bits_overrides"] and not list((tmp_path / "mixed").glob("cand-*"))
    load_quantized(tmp_path / "mixed")
    report = _quantize(tiny_folder, tmp_path / "rtn", QuantConfig(bits=4, method="rtn-g128"))
    assert report.n_weights > 0 and "backward" not in report.seconds
    load_quantized(tmp_path / "rtn")


def test_large_folders_are_sharded_with_an_index_and_load(tiny_folder, tmp_path, monkeypatch):
    import core.folder_writer as sq
    from core.checkpoint import load_quantized

    monkeypatch.setattr(sq, "MERGE_LIMIT", 1)
    _quantize(tiny_folder, tmp_path / "sharded", QuantConfig(bits=4))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    monkeypatch.setattr(sq, "MERGE_LIMIT", 2 << 30)
    _quantize(tiny_folder, tmp_path / "single", QuantConfig(bits=4))
    ids = torch.randint(0, 1000, (1, 16))
    a = load_quantized(tmp_path / "sharded").model(ids).logits
    b = load_quantized(tmp_path / "single").model(ids).logits
    assert torch.equal(a, b)
    import core.interop  # noqa: F401  registers the quantization method with transformers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.allclose(hf(ids).logits, a, atol=1e-5)


def test_a_second_run_reads_the_fisher_from_the_cache(tiny_folder, tmp_path, monkeypatch):
    computed = _quantize(tiny_folder, tmp_path / "computed", QuantConfig(bits=4))
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SQUEEZE_FISHER_CACHE_GB", "8")
    _quantize(tiny_folder, tmp_path / "first", QuantConfig(bits=3))
    assert len(list((tmp_path / "cache" / "fisher").glob("*-blocks/block-*.safetensors"))) == 4
    events = []
    job = QuantizeJob(model=str(tiny_folder), output=tmp_path / "cached", config=QuantConfig(bits=4), calibration=CAL,
                      device="cpu")
    run_to_end(run_quantize_job(job), events.append)
    assert any(e.message == "sensitivity: from the cache" for e in events)
    assert not any(e.stage == "backward" and "block" in e.message for e in events)
    assert computed.bits_per_weight > 0
    assert_same_folder(tmp_path / "computed", tmp_path / "cached")


def test_not_enough_memory_is_refused_with_the_fix(tiny_folder, tmp_path, monkeypatch):
    import core.memory_plan as mp

    monkeypatch.setattr(mp, "available_memory", lambda: 1 << 20)
    with pytest.raises(UserError, match="not enough memory.*--samples"):
        _quantize(tiny_folder, tmp_path / "q", QuantConfig(bits=4))
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()


def test_memory_budget_spills_block_inputs_and_gives_the_same_folder(tiny_folder, tmp_path):
    # the embedding and head in float16: their k-means at the end would leave room for every block input
    config = QuantConfig(bits=3, embed_bits=16, head_bits=16)
    _quantize(tiny_folder, tmp_path / "ram", config)
    plan_events = []
    job = QuantizeJob(model=str(tiny_folder), output=tmp_path / "disk", config=config, calibration=CAL,
                      device="cpu", cpu_memory=1)  # 1 byte: everything that can go to disk does
    with pytest.raises(UserError, match="--cpu-memory"):
        run_to_end(run_quantize_job(job), plan_events.append)
    import core.memory_plan as mp
    from core.lazy_model import LazyModel as _L

    plan = mp.plan_for(_L.open(tiny_folder), CAL.samples, CAL.seqlen)
    base = plan.without_block_inputs
    offload = tmp_path / "offload"
    dead = offload / ".squeeze-activations.otherhost-1.partial"  # another machine's: never touched
    dead.mkdir(parents=True)
    job = QuantizeJob(model=str(tiny_folder), output=tmp_path / "disk", config=config, calibration=CAL,
                      device="cpu", cpu_memory=base + 1, offload_dir=offload)
    events, spilled = [], []
    for event in run_quantize_job(job):
        events.append(event)
        spilled += [p for p in offload.glob(f".squeeze-activations.*-{os.getpid()}.partial/*.safetensors")]
    assert any("go to disk" in e.message for e in events) and spilled
    assert sorted(offload.iterdir()) == [dead], "this run's activations are gone once it ends"
    assert_same_folder(tmp_path / "ram", tmp_path / "disk")


def assert_same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------- resume after kill -9


def _cli(folder: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "core.cli", "-q", "quantize", str(folder), "--bits", "3", "--samples", "6",
            "--seqlen", "128", "--output", str(output), *extra]


def _env(cache: Path) -> dict:
    return {**os.environ, "SQUEEZE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "SQUEEZE_FISHER_CACHE_GB": "0"}


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory, demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return _save(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("deep") / "deep", demo_tokenizer)


@pytest.fixture(scope="module")
def uninterrupted(deep_folder, tmp_path_factory):
    """The folder an uninterrupted run of the command writes."""
    root = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_cli(deep_folder, root / "whole"), env=_env(root / "cache"), check=True, timeout=600)
    return root / "whole"


def _kill_when(process: subprocess.Popen, state: Path, blocks: int, delay: float) -> int:
    """SIGKILL the run once its staging state records ``blocks`` finished blocks (plus ``delay`` s)."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        try:
            done = len(json.loads(state.read_text())["blocks"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= blocks:
            time.sleep(delay)
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return done


@pytest.mark.parametrize("delay", [0.0, 0.15], ids=["at-a-block-boundary", "mid-block"])
def test_a_killed_run_resumes_to_a_bit_identical_folder(deep_folder, uninterrupted, tmp_path, delay):
    cache = tmp_path / "cache"
    output = tmp_path / "resumed"
    run = subprocess.Popen(_cli(deep_folder, output), env=_env(cache))
    done = _kill_when(run, tmp_path / ".resumed.partial" / "state.json", 3, delay)
    assert 3 <= done < 8, "killed while blocks were still left to do"
    assert not output.exists() and (tmp_path / ".resumed.partial").is_dir()
    again = subprocess.run(_cli(deep_folder, output), env=_env(cache), timeout=600, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert_same_folder(uninterrupted, output)
    assert not (tmp_path / ".resumed.partial").exists(), "the staging folder is gone once the output is in place"


def test_restart_starts_over_and_a_live_run_is_not_disturbed(deep_folder, tmp_path):
    from core.staging import Staging

    output = tmp_path / "out"
    run = subprocess.Popen(_cli(deep_folder, output), env=_env(tmp_path / "cache"))
    _kill_when(run, tmp_path / ".out.partial" / "state.json", 2, 0.0)
    key = json.loads((tmp_path / ".out.partial" / "state.json").read_text())["key"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / ".out.partial" / "owner").write_text(f"{socket.gethostname()}:{sleeper.pid}")
        with pytest.raises(UserError, match="another squeeze run"):
            Staging(output, key).open()
    finally:
        sleeper.kill()
        sleeper.wait()
    staging = Staging(output, key, restart=True)
    assert staging.open()["blocks"] == {} and staging.resumed_blocks == 0
    staging.release()


@pytest.mark.demo
def test_demo_model_streams_to_the_whole_model_paths_perplexity(tmp_path):
    """The real demo model, default settings on a few windows: the same perplexity both ways."""
    from core.checkpoint import load_quantized
    from core.data import calibration_windows, corpus_tokens, evaluation_windows
    from core.evaluate import perplexity
    from core.models import load_model
    from core.quantize import quantize_model

    calibration = CalibrationConfig(samples=2, seqlen=128)
    config = QuantConfig(bits=3, embed_bits=16, head_bits=16)  # the whole-model path keeps them float16
    job = QuantizeJob(model="demo", output=tmp_path / "demo-3bit", config=config, calibration=calibration,
                      device="cpu")
    report = run_to_end(run_quantize_job(job))
    whole = load_model("demo")
    tokens = corpus_tokens(whole.tokenizer, "builtin")
    windows = calibration_windows(tokens, calibration.samples, calibration.seqlen, calibration.seed)
    fisher = run_to_end(compute_fisher(whole.model, windows, quantizable_linears(whole.model)))
    whole_report = run_to_end(quantize_model(whole.model, config, fisher))
    assert report.range_multiplier == pytest.approx(whole_report.range_multiplier)
    assert report.sparse_percent == pytest.approx(whole_report.sparse_percent, rel=1e-3)
    evaluation = evaluation_windows(tokens, 4, 256)
    streamed = run_to_end(perplexity(load_quantized(tmp_path / "demo-3bit").model, evaluation)).perplexity
    reference = run_to_end(perplexity(whole.model, evaluation)).perplexity
    # the folder keeps the embedding/head in float16 (perplexity unchanged to ~1e-5); the rest is float noise
    assert streamed == pytest.approx(reference, rel=2e-3)


def test_dead_runs_staging_is_swept_but_a_resumable_one_is_kept(tmp_path):
    import socket

    from core.staging import STALE_SECONDS, sweep_stale_staging

    def staging(name: str, pid: int, age: float) -> Path:
        folder = tmp_path / f".{name}.partial"
        (folder / "activations").mkdir(parents=True)
        (folder / "owner").write_text(f"{socket.gethostname()}:{pid}")
        os.utime(folder, (time.time() - age, time.time() - age))
        return folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = staging("old", dead_pid, STALE_SECONDS + 60)
    recent = staging("recent", dead_pid, 60)
    live = staging("live", os.getpid(), STALE_SECONDS + 60)
    sweep_stale_staging(tmp_path, keep=tmp_path / ".other.partial")
    assert not old.exists(), "an abandoned run of another output, a week old, is removed"
    assert recent.is_dir() and not (recent / "activations").exists(), "a recent one stays resumable, minus its spill"
    assert (live / "activations").is_dir(), "a live run is never touched"


def _normal_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def test_quantized_folders_get_the_users_normal_permissions(tiny_folder, tmp_path, quantized_model_and_tokenizer):
    from core.checkpoint import save_quantized

    _quantize(tiny_folder, tmp_path / "streamed", QuantConfig(bits=4, method="rtn"))
    model, tokenizer = quantized_model_and_tokenizer
    run_to_end(save_quantized(model, tokenizer, tmp_path / "saved", {}))
    for folder in (tmp_path / "streamed", tmp_path / "saved"):
        assert folder.stat().st_mode & 0o777 == _normal_mode(), folder  # mkdtemp made them 0700


@pytest.fixture
def quantized_model_and_tokenizer(demo_tokenizer):
    from core.quantize import quantize_model

    model = build_tiny_model("llama")
    run_to_end(quantize_model(model, QuantConfig(bits=4), None))
    return model, demo_tokenizer
