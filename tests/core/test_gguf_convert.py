"""GGUF -> safetensors folder, one tensor at a time: values as transformers' whole-model GGUF load,
memory of one tensor, the cache, shards, and UserErrors for bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import core.gguf_convert as gguf_convert
from core.errors import UnsupportedModelError, UserError
from core.gguf_convert import cached_gguf_conversion, convert_gguf, gguf_folder
from core.models import demo_gguf_path, load_model
from core.progress import run_to_end
from core.shard_writer import INDEX_FILE, SINGLE_FILE, ShardWriter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """A tiny LLaMA (tied) and Mistral (untied) exported as GGUF files: F32 matrices, and F16 ones."""
    from core.interop.export import export_model
    from tests.core.test_interop_export import small_vocab_folder

    root = tmp_path_factory.mktemp("tiny-gguf")
    files = {}
    for arch in ("llama", "mistral"):
        files[arch] = folder = small_vocab_folder(root / arch, arch)
        for dtype in (torch.float32, torch.float16):
            name = f"{arch}-{str(dtype)[6:]}"
            files[name] = run_to_end(export_model(folder, "gguf", root / "g" / f"{name}.gguf", dtype=dtype))
    return files


def whole_load(gguf: Path):
    """transformers' own GGUF load of the whole model, dequantized to float32 (the reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def folder_load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    dtypes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            dtypes.update({name: handle.get_tensor(name).dtype for name in handle.keys()})
    return dtypes


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- the shard writer


def test_shard_writer_round_trips_every_dtype_in_one_file(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2, 3).bfloat16(),
               "d": torch.arange(5, dtype=torch.int64), "e": torch.randn(4, 6).t()}  # e: not contiguous
    writer = ShardWriter(tmp_path, max_shard_bytes=1 << 20)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert writer.close() == [tmp_path / SINGLE_FILE]
    back = load_file(tmp_path / SINGLE_FILE)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert not (tmp_path / INDEX_FILE).exists() and not list(tmp_path.glob(".*"))


def test_shard_writer_splits_by_bytes_and_by_header_room(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"layer.{i}.weight": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    writer = ShardWriter(tmp_path / "bytes", max_shard_bytes=1000)  # two tensors per shard
    (tmp_path / "bytes").mkdir()
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert [f.name for f in files] == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "bytes" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 4000
    assert index["weight_map"]["layer.9.weight"] == "model-00005-of-00005.safetensors"
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / "bytes" / file)[name], tensors[name])
    small = ShardWriter(tmp_path / "header", max_shard_bytes=1 << 20, header_bytes=200)
    (tmp_path / "header").mkdir()
    for name, tensor in tensors.items():
        small.add(name, tensor)
    assert len(small.close()) > 1  # the header reserve, not the bytes, closed the shards


# ---------------------------------------------------------------- tiny GGUF files


@pytest.mark.parametrize("name", ["llama-float32", "llama-float16"])
def test_tensors_and_logits_equal_the_whole_model_load(tiny_ggufs, name, tmp_path):
    """Stored in float32, every tensor is the one transformers' own GGUF load gives (q/k un-permuted,
    tied or untied head), bit for bit, and so are the logits."""
    gguf = tiny_ggufs[name]
    folder = run_to_end(convert_gguf(gguf, tmp_path / "out", dtype=torch.float32))
    reference, converted = whole_load(gguf), folder_load(folder)
    expected, got = reference.state_dict(), converted.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert converted.config.tie_word_embeddings == reference.config.tie_word_embeddings
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(converted, ids), logits(reference, ids))


def test_mistral_gguf_converts_although_the_whole_model_load_fails(tiny_ggufs, tmp_path):
    """llama.cpp writes Mistral as architecture "llama"; transformers' own load then asks gguf-py for a
    "mistral" name table and fails, so the reference is the model that was exported."""
    from core.checkpoint import load_quantized

    gguf = tiny_ggufs["mistral-float32"]
    with pytest.raises(NotImplementedError, match="mistral"):  # if this starts passing, compare to it
        whole_load(gguf)
    converted = folder_load(run_to_end(convert_gguf(gguf, tmp_path / "out", dtype=torch.float32)))
    assert type(converted).__name__ == "MistralForCausalLM"
    source = load_quantized(tiny_ggufs["mistral"]).model
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(converted, ids), logits(source, ids), rtol=1e-4, atol=1e-4)


def test_default_dtype_keeps_f32_tensors_and_stores_the_rest_in_float16(tiny_ggufs, tmp_path):
    from gguf import GGUFReader

    gguf = tiny_ggufs["llama-float16"]
    events = []
    folder = run_to_end(convert_gguf(gguf, tmp_path / "out"), events.append)
    dtypes = stored_dtypes(folder)
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == torch.float16
    assert dtypes["model.layers.1.post_attention_layernorm.weight"] == torch.float32  # F32 in the file
    assert "lm_head.weight" not in dtypes  # tied: stored once, as the embedding
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    # An F16 file loses nothing in float16: the values are the whole load's, exactly.
    expected = whole_load(gguf).state_dict()
    for key, value in folder_load(folder).state_dict().items():
        assert torch.equal(value, expected[key]), key
    tensor_events = [e for e in events if e.total]
    count = len(GGUFReader(gguf).tensors)
    assert [e.done for e in tensor_events] == list(range(1, count + 1))  # one event per tensor
    assert events[0].total == 0 and len(events) == count + 1  # and one while reading the metadata
    assert all(e.stage == "convert" for e in events)


def test_bfloat16_when_asked_and_folder_loads_through_load_model(tiny_ggufs, tmp_path):
    gguf = tiny_ggufs["llama-float32"]
    folder = run_to_end(convert_gguf(gguf, tmp_path / "out", dtype=torch.bfloat16))
    dtypes = stored_dtypes(folder)
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.norm.weight"] == torch.float32
    expected = whole_load(gguf).state_dict()
    got = folder_load(folder).state_dict()
    for key in expected:
        assert torch.equal(got[key], expected[key].to(dtypes.get(key, torch.bfloat16)).float()), key
    loaded = load_model(str(folder))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert (folder / "generation_config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_one_dequantized_tensor_alive_at_a_time(tiny_ggufs, tmp_path, monkeypatch):
    real = gguf_convert._dequantize
    alive: list[weakref.ref] = []
    most = [0]

    def tracking(tensor):
        live = sum(ref() is not None for ref in alive)
        most[0] = max(most[0], live)
        array = real(tensor)
        alive.append(weakref.ref(array))
        return array

    monkeypatch.setattr(gguf_convert, "_dequantize", tracking)
    run_to_end(convert_gguf(tiny_ggufs["mistral-float16"], tmp_path / "out"))
    assert len(alive) >= 20 and most[0] == 0  # the previous tensor is gone before the next is read


def test_sharded_output_has_an_index_and_loads(tiny_ggufs, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", 200_000)
    gguf = tiny_ggufs["llama-float32"]
    folder = run_to_end(convert_gguf(gguf, tmp_path / "out", dtype=torch.float32))
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / SINGLE_FILE).exists()
    assert all((folder / shard).stat().st_size < 200_000 + 300_000 for shard in shards)
    expected = whole_load(gguf).state_dict()
    for key, value in folder_load(folder).state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_second_call_hits_the_cache_and_a_changed_file_does_not(tiny_ggufs, tmp_path, monkeypatch):
    gguf = tmp_path / "copy.gguf"
    gguf.write_bytes(tiny_ggufs["llama-float16"].read_bytes())
    first = gguf_folder(gguf)
    assert first.parent.parent == tmp_path / "cache" and first.stat().st_mode & 0o777 == 0o755
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert gguf_folder(gguf) == first
    assert list(cached_gguf_conversion(gguf)) == []  # no events: nothing to do
    monkeypatch.setattr(gguf_convert, "convert_gguf", convert_gguf)
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert gguf_folder(gguf) != first
    assert gguf_folder(gguf, dtype=torch.float32) not in (first, gguf_folder(gguf))
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]


def test_cancel_leaves_nothing_behind(tiny_ggufs, tmp_path):
    steps = convert_gguf(tiny_ggufs["llama-float16"], tmp_path / "out")
    for event in steps:
        if event.done == 5:
            break
    steps.close()
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_corrupt_gguf_is_a_user_error(tiny_ggufs, tmp_path):
    data = tiny_ggufs["llama-float16"].read_bytes()
    for cut in (64, 5000, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="does not load.*truncated"):
            load_model(str(bad))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    with pytest.raises(UserError, match="does not load"):
        load_model(str(garbage))
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def _gguf_of_architecture(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_architecture_without_mapping_is_named(tmp_path):
    path = _gguf_of_architecture(tmp_path / "odd.gguf", "madeupformer")
    with pytest.raises(UnsupportedModelError, match="'madeupformer' has no tensor mapping"):
        run_to_end(convert_gguf(path, tmp_path / "out"))
    with pytest.raises(UserError, match="madeupformer"):
        load_model(str(path))
    assert not (tmp_path / "out").exists()


def test_float16_overflow_is_kept_in_float32():
    import gguf

    q4 = gguf.GGMLQuantizationType.Q4_1
    assert gguf_convert._storage_dtype(torch.tensor([1.0, -7e4]), q4, torch.float16) == torch.float32
    assert gguf_convert._storage_dtype(torch.tensor([1.0, -6e4]), q4, torch.float16) == torch.float16
    assert gguf_convert._storage_dtype(torch.tensor([1e5]), q4, torch.bfloat16) == torch.bfloat16
    f32 = gguf.GGMLQuantizationType.F32
    assert gguf_convert._storage_dtype(torch.tensor([1.0]), f32, torch.float16) == torch.float32  # a norm
    assert gguf_convert._storage_dtype(torch.ones(2, 2), f32, torch.float16) == torch.float16  # a matrix


def test_default_dtype_follows_the_file():
    from gguf import GGMLQuantizationType as Q

    assert gguf_convert._default_dtype({Q.F32}) == torch.float32
    assert gguf_convert._default_dtype({Q.F32, Q.F16}) == torch.float16
    assert gguf_convert._default_dtype({Q.F32, Q.Q4_1, Q.Q8_0}) == torch.float16
    assert gguf_convert._default_dtype({Q.F32, Q.BF16, Q.Q4_K}) == torch.bfloat16


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_0"])
def test_chunked_dequantization_equals_whole_tensor_dequantization(qtype, monkeypatch):
    import gguf
    from gguf.quants import dequantize, quantize

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    values = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)
    tensor = types.SimpleNamespace(data=quantize(values, kind), tensor_type=kind, name="t")
    monkeypatch.setattr(gguf_convert, "DEQUANT_CHUNK_ELEMENTS", 96 * 5)  # 5 rows a chunk, 8 chunks
    got = gguf_convert._dequantize(tensor)
    assert got.shape == (37, 96) and np.array_equal(got, dequantize(tensor.data, kind))


# ---------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo_reference():
    return whole_load(demo_gguf_path())


DEMO_IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 5253, 30, 378, 3575, 282, 4649, 314]])


@pytest.mark.demo
def test_demo_folder_equals_the_whole_gguf_load_bit_for_bit(demo_dir, demo_reference):
    """The demo is stored in float32, so every tensor and the logits are exactly transformers' load."""
    converted = folder_load(demo_dir)
    expected, got = demo_reference.state_dict(), converted.state_dict()
    assert got.keys() == expected.keys() and len(got) == 273  # 272 stored + the tied head
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(logits(converted, DEMO_IDS), logits(demo_reference, DEMO_IDS))
    assert set(stored_dtypes(demo_dir).values()) == {torch.float32}


_MEASURE = r"""
import json, re, sys, time
from pathlib import Path
from core.gguf_convert import convert_gguf
from core.models import demo_gguf_path

def status_mib(field):  # ru_maxrss would carry the parent's peak across exec: read this process's own
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

start, began = status_mib("VmRSS"), time.perf_counter()
for event in convert_gguf(demo_gguf_path(), Path(sys.argv[1])):
    if event.done == 1:  # the metadata is read: from here on only tensors are added
        metadata_peak, loop_start = status_mib("VmHWM"), status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark
    if event.done == event.total and event.total:
        loop_peak = status_mib("VmHWM")
seconds = time.perf_counter() - began
peak = max(metadata_peak, status_mib("VmHWM"))  # the tokenizer files are written after the loop
print(json.dumps({"seconds": round(seconds, 1), "start_mib": start, "peak_mib": peak,
                  "loop_start_mib": loop_start, "loop_peak_mib": loop_peak}))
"""


@pytest.mark.demo
def test_demo_in_float16_streams_one_tensor_at_a_time_and_keeps_the_logits(tmp_path, demo_reference):
    """Converted in a fresh process with the default dtype (float16 matrices, float32 norms): the
    tensor loop's memory stays far under the model's size, each value is the float32 reference
    rounded to float16, and the logits stay within a measured bound."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak of the tensor loop")
    out = tmp_path / "demo-f16"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(out)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    numbers = json.loads(run.stdout.strip().splitlines()[-1])
    print("demo float16 conversion:", numbers)
    fp32_mib = sum(v.numel() for v in demo_reference.parameters()) * 4 / 2**20  # 513 MiB
    # The loop holds one dequantized tensor (the largest: the 49152 x 576 embedding, 108 MiB in
    # float32, plus its float16 copy) and the mapped pages of the 98 MiB file, never the model.
    # Measured: +63 MiB in the loop, peak 660 MiB from 220 MiB in all; most of that is the vocabulary
    # parsed by gguf-py and the tokenizer (transformers' whole load peaks at 1164 MiB).
    assert numbers["loop_peak_mib"] - numbers["loop_start_mib"] < 0.6 * fp32_mib
    assert numbers["peak_mib"] - numbers["start_mib"] < fp32_mib

    dtypes = stored_dtypes(out)
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.float16
    assert dtypes["model.layers.0.input_layernorm.weight"] == torch.float32
    converted = folder_load(out)
    expected = demo_reference.state_dict()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, expected[key].to(dtypes.get(key, torch.float16)).float()), key
    ref, got = logits(demo_reference, DEMO_IDS), logits(converted, DEMO_IDS)
    assert (got - ref).abs().max() < 0.1  # measured 0.031 (logits up to 30.9; mean difference 0.005)
    assert torch.equal(got[0].argmax(-1), ref[0].argmax(-1))
