"""Peak memory and decode speed at 1.1 B parameters: where the weights, not the runtime, set the memory.

python -m bench.memory_scale [--new-tokens 16] [--rounds 2] [--workdir DIR]

The demo model is so small (135 M parameters, 513 MB in fp32) that the Python + torch + transformers
runtime is half of its peak memory in chat. This benchmark builds a LLaMA with TinyLlama-1.1B's shape
(hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632; the demo tokenizer's vocabulary
of 49,152, untied head) with seeded random weights, saves it as an fp32 folder, quantizes it (3-bit
dense-only and dense-and-sparse, random positive Fisher: memory and speed do not depend on it) and
measures every variant in its own process with bench.cpu_inference's worker: peak RSS after load +
greedy decode (the chat case) and decode tokens/s, ``--rounds`` interleaved rounds keeping each
variant's best speed and highest peak. Folders are cached in the workdir (about 6 GB).
Writes the "scale" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.cpu_inference import format_mib, load_line, quantize_with_random_fisher, run_worker
from bench.report import machine_line, update_section

SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}
QUANTIZED = {"3-bit dense-only": (3, True), "3-bit dense-and-sparse (0.45% + 0.05%)": (3, False)}


def fp32_folder(workdir: Path) -> Path:
    """The random 1.1 B LLaMA as a plain fp32 safetensors folder with the demo tokenizer (made once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import load_model

    folder = workdir / "llama-1.1b-random-fp32"
    if (folder / "config.json").exists():
        return folder
    print("building the random 1.1 B LLaMA", flush=True)
    tokenizer = load_model("demo").tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPE)
    model = LlamaForCausalLM(config).eval()
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def quantized_folders(workdir: Path, source: Path) -> dict[str, Path]:
    """label -> quantized 1.1 B folder, made once and reused."""
    folders = {}
    for label, (bits, dense_only) in QUANTIZED.items():
        folder = workdir / f"llama-1.1b-random-{bits}bit-{'dense' if dense_only else 'sparse'}"
        if not folder.exists():
            quantize_with_random_fisher(str(source), bits, dense_only, folder, label)
        folders[label] = folder
    return folders


def markdown(results: dict[str, dict], parameters: int, args, loads: tuple[str, str]) -> str:
    base = results["fp32 original"]
    lines = [
        "## Memory and decode at 1.1 B parameters", "", machine_line(), "",
        f"A LLaMA with TinyLlama-1.1B's shape ({parameters / 1e9:.2f} B parameters: hidden 2048, 22 layers, "
        "32 / 4 heads, intermediate 5632, the demo tokenizer's 49,152-token vocabulary, untied head) with seeded "
        "random weights, quantized with a random positive Fisher (memory and speed do not depend on the values). "
        f"Each variant in its own process, {args.rounds} interleaved rounds keeping its best speed: load, greedy decode with KV cache, batch 1, "
        f"{args.new_tokens} new tokens after a 9-token prompt; peak RSS = VmHWM after loading and decoding (the "
        f"chat case), the same measure as the demo-model section ({loads[0]} before, {loads[1]} after). "
        "Quantized folders store the embedding and head in float16.", "",
        "| model | decode tok/s | x fp32 | peak RSS | % of fp32 |", "|---|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['decode_median']:.2f} | {r['decode_median'] / base['decode_median']:.2f} | "
                     f"{format_mib(r['peak_rss'])} | {100 * r['peak_rss'] / base['peak_rss']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant (best speed kept)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the 1.1 B folders are cached")
    args = parser.parse_args()
    from cuda_ext.jit import cache_root

    workdir = args.workdir or cache_root().parent.parent / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    source = fp32_folder(workdir)
    folders = quantized_folders(workdir, source)
    common = {"new_tokens": args.new_tokens, "prefill": 0}
    specs = {"fp32 original": {"kind": "dense", "dtype": "float32", "model": str(source), **common}}
    specs.update({label: {"kind": "quantized", "folder": str(folder), **common} for label, folder in folders.items()})
    before = load_line()
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for label, spec in specs.items():
            result = run_worker(spec)
            print(f"round {round_ + 1} {label}: {result} ({load_line()})", flush=True)
            best = results.setdefault(label, result)
            best["decode_median"] = max(best["decode_median"], result["decode_median"])
            best["peak_rss"] = max(best["peak_rss"], result["peak_rss"])
    text = markdown(results, parameter_count(source), args, (before, load_line()))
    update_section("scale", text)
    print(text)


def parameter_count(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files (read from their headers)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


if __name__ == "__main__":
    main()
