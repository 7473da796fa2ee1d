"""Random-weight LLaMA folders with the shapes of real models, written tensor by tensor in bfloat16.

python -m bench.big_models [SHAPE ...] [--workdir DIR]     (SHAPE: tiny, 1.1b, 3b, 8b; default all but tiny)

Each folder is a standard Hugging Face layout: config.json (transformers.LlamaConfig with the real
shape, dtype bfloat16, the demo tokenizer's vocabulary), safetensors shards named
model-0000k-of-0000N.safetensors (at most ~3.5 GB each) with model.safetensors.index.json, and the
demo tokenizer's files. Weights are normal with std 0.02 (norms are ones), seeded per tensor, so a
folder is the same every time it is built. Every shard is streamed to disk a few MB at a time (the
safetensors header is computed from the shapes first): building the 8 B folder needs ~100 MB of
memory, not 16 GB. A folder is written as NAME.partial and renamed when complete; finished folders are
reused. The workdir is ``--workdir``, else $SQUEEZE_BENCH_DIR, else ~/.cache/squeeze-studio/bench.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# name -> (folder name, LlamaConfig keyword arguments)
SHAPES = {
    "tiny": ("llama-tiny-random-bf16", {
        "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "1.1b": ("tinyllama-1.1b-shape-random-bf16", {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "tie_word_embeddings": False}),
    "1.1b-11": ("tinyllama-1.1b-width-11-layers-random-bf16", {  # half the depth: memory against depth
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 11, "num_attention_heads": 32,
        "num_key_value_heads": 4, "tie_word_embeddings": False}),
    "3b": ("llama-3.2-3b-shape-random-bf16", {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
        "num_key_value_heads": 8, "tie_word_embeddings": True, "rope_theta": 500000.0}),
    "8b": ("llama-3.1-8b-shape-random-bf16", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "tie_word_embeddings": False, "rope_theta": 500000.0}),
}
LABELS = {"tiny": "tiny LLaMA (hidden 256, 4 layers)", "1.1b": "TinyLlama-1.1B shape",
          "1.1b-11": "TinyLlama-1.1B width, 11 layers",
          "3b": "Llama-3.2-3B shape", "8b": "Llama-3.1-8B shape"}
MAX_SHARD_BYTES = 3_500_000_000
CHUNK = 8 * 2**20  # elements generated at a time (32 MB of float32)
STD = 0.02


def default_workdir() -> Path:
    explicit = os.environ.get("SQUEEZE_BENCH_DIR")
    return Path(explicit).expanduser() if explicit else Path.home() / ".cache" / "squeeze-studio" / "bench"


def demo_tokenizer():
    """The demo model's tokenizer (loaded from its cached folder: no model weights are built)."""
    from transformers import AutoTokenizer

    from core.models import demo_model_dir

    return AutoTokenizer.from_pretrained(demo_model_dir())


def llama_config(shape_name: str, tokenizer):
    from transformers import LlamaConfig

    _, shape = SHAPES[shape_name]
    return LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       dtype="bfloat16", **shape)


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor LlamaForCausalLM stores, in its usual order."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [("model.embed_tokens.weight", (config.vocab_size, h))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
    shapes.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        shapes.append(("lm_head.weight", (config.vocab_size, h)))
    return shapes


def parameter_count(config) -> int:
    return sum(math.prod(shape) for _, shape in tensor_shapes(config))


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors in as few shards of balanced size as MAX_SHARD_BYTES allows."""
    total = sum(2 * math.prod(s) for _, s in shapes)
    n = max(1, math.ceil(total / MAX_SHARD_BYTES))
    target = total / n
    shards: list[list] = [[]]
    filled = 0  # bytes in the current shard
    for name, shape in shapes:
        size = 2 * math.prod(shape)
        if shards[-1] and filled + size / 2 > target and len(shards) < n:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += size
    return shards


def _write_tensor(stream, name: str, shape: tuple[int, ...], seed: int) -> None:
    """Stream one bf16 tensor: ones for norms, else N(0, STD) drawn CHUNK elements at a time."""
    numel = math.prod(shape)
    if name.endswith("norm.weight"):
        stream.write(torch.ones(numel, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
        return
    g = torch.Generator().manual_seed(seed)
    for start in range(0, numel, CHUNK):
        chunk = torch.empty(min(CHUNK, numel - start)).normal_(0.0, STD, generator=g)
        stream.write(chunk.to(torch.bfloat16).view(torch.uint8).numpy().data)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seeds: dict[str, int]) -> int:
    """Write a safetensors file of bf16 tensors without holding them: header first, then the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        for name, shape in tensors:
            _write_tensor(stream, name, shape, seeds[name])
    return offset


def random_folder(shape_name: str, workdir: Path | None = None, *, log=print, tokenizer=None, jobs: int = 1) -> Path:
    """The random bf16 LLaMA folder with shape ``shape_name`` (a key of SHAPES), built once in ``workdir``.

    tokenizer: the one whose vocabulary and files the folder gets (default the demo model's);
    jobs: shards written at once (threads; a machine with cores to spare builds the 8 B folder faster).
    """
    folder_name, _ = SHAPES[shape_name]
    workdir = Path(workdir) if workdir is not None else default_workdir()
    folder = workdir / folder_name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tokenizer = tokenizer if tokenizer is not None else demo_tokenizer()
    config = llama_config(shape_name, tokenizer)
    shapes = tensor_shapes(config)
    seeds = {name: 1000 * list(SHAPES).index(shape_name) + i for i, (name, _) in enumerate(shapes)}
    shards = plan_shards(shapes)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"building {folder} ({parameter_count(config) / 1e9:.2f} B parameters, {len(shards)} shards)")
    weight_map, total = {}, 0
    files = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # the draws and the writes release the GIL
        sizes = pool.map(lambda job: write_shard(tmp / job[0], job[1], seeds), zip(files, shards))
        for file, tensors, size in zip(files, shards, sizes):
            total += size
            weight_map.update({name: file for name, _ in tensors})
            log(f"  {file}: {len(tensors)} tensors, {total / 1e9:.2f} GB so far, {time.perf_counter() - t0:.0f} s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    log(f"built {folder} in {time.perf_counter() - t0:.0f} s")
    return folder


def folder_parameters(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files (read from the headers only)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def check_loads(folder: Path) -> None:
    """Load the folder with transformers in bf16: every expected weight present, none unexpected."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    n = sum(p.numel() for p in model.parameters())
    del model
    if problems:
        raise RuntimeError(f"{folder} loads with problems: {problems}")
    print(f"{folder}: loads cleanly, {n / 1e9:.3f} B parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=["1.1b", "3b", "8b"], help=", ".join(SHAPES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--check", action="store_true", help="load each folder with transformers afterwards")
    args = parser.parse_args()
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
    torch.set_num_threads(1)  # a shared machine: one core draws the numbers, the other is left free
    for name in args.shapes:
        folder = random_folder(name, args.workdir, log=lambda m: print(m, flush=True))
        if args.check:
            check_loads(folder)


if __name__ == "__main__":
    main()
