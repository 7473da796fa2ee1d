"""Decode and prefill speed and peak memory of the demo model on the CPU: fp32, bf16, 5-, 4- and 3-bit.

python -m bench.cpu_inference [--new-tokens 64] [--prefill 512] [--rounds 3] [--skip-reference]

Quantizes the demo model (3/4-bit, dense-only and dense-and-sparse; 5-bit dense-only) once with a random positive
Fisher (speed does not depend on it) into a cached folder, then measures every variant in its own
subprocess, so each peak resident memory (VmHWM) is that model's alone: the quantized ones
are loaded with core.checkpoint.load_quantized, which never materialises dense weights.
Decode: greedy, KV cache, batch 1, ``--new-tokens`` after a short prompt (tokens/s from the
median step, the original SqueezeLLM's measure, and from the total). Prefill: one forward of
``--prefill`` tokens (best of two). Every variant runs once per round, rounds interleaved, and keeps
its best speeds, which evens out other load on a shared machine. Also times the kernel's mat-vec path against its dequantize +
GEMM path to pick the crossover. Writes the "cpu" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.report import machine_line, update_section

DENSE = {"fp32 original": torch.float32, "bf16": torch.bfloat16}
QUANTIZED = {  # label -> (bits, dense-only?)
    "5-bit dense-only": (5, True),  # the width that meets Q4_K_M's quality (bench.llamacpp)
    "4-bit dense-only": (4, True),
    "4-bit dense-and-sparse (0.45% + 0.05%)": (4, False),
    "3-bit dense-only": (3, True),
    "3-bit dense-and-sparse (0.45% + 0.05%)": (3, False),
}
REFERENCE_OF = "4-bit dense-and-sparse (0.45% + 0.05%)"
REFERENCE = "4-bit dense-and-sparse, torch reference (no kernel)"


def quant_config(bits: int, dense_only: bool):
    from core.config import OutlierConfig, QuantConfig

    if dense_only:
        return QuantConfig(bits=bits, outliers=OutlierConfig(percent=None), sensitivity_percent=0.0)
    return QuantConfig(bits=bits)


def quantize_with_random_fisher(model: str, bits: int, dense_only: bool, folder: Path, label: str) -> None:
    """Quantize ``model`` (a load_model spec) with a seeded random positive Fisher (speed and memory do
    not depend on it) and save it to ``folder``."""
    from core.checkpoint import save_quantized
    from core.models import load_model, quantizable_linears
    from core.progress import run_to_end
    from core.quantize import quantize_model

    print(f"quantizing {model}: {label}", flush=True)
    loaded = load_model(model)
    g = torch.Generator().manual_seed(0)
    fisher = {name: torch.rand(lin.weight.shape, generator=g) + 1e-3
              for name, lin in quantizable_linears(loaded.model).items()}
    run_to_end(quantize_model(loaded.model, quant_config(bits, dense_only), fisher))
    del fisher
    run_to_end(save_quantized(loaded.model, loaded.tokenizer, folder, {"bench": label}))


def quantized_folders(workdir: Path) -> dict[str, Path]:
    """label -> quantized demo folder, made once (random positive Fisher, seeded) and reused; the name
    carries the embedding/head width, so a folder made under another default is not reused."""
    folders = {}
    for label, (bits, dense_only) in QUANTIZED.items():
        table = quant_config(bits, dense_only).embed_bits
        folder = workdir / f"demo-{bits}bit-{'dense' if dense_only else 'sparse'}-table{table}"
        if not folder.exists():
            quantize_with_random_fisher("demo", bits, dense_only, folder, label)
        folders[label] = folder
    return folders


# ---------------------------------------------------------------- worker (one subprocess per variant)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, not ru_maxrss, which Linux carries over from the
    parent across fork + exec (a parent that loaded models would set every worker's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@torch.inference_mode()
def decode_steps(model, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds of each greedy step after the prompt (batch 1, KV cache)."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    steps = []
    for _ in range(new_tokens):
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        out = model(input_ids=next_id, past_key_values=out.past_key_values, use_cache=True)
        out.logits[:, -1].argmax(-1)
        steps.append(time.perf_counter() - t0)
    return steps


@torch.inference_mode()
def prefill_seconds(model, length: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return best


def worker(spec: dict) -> dict:
    """Load one variant, measure; the peak RSS is read after load + chat decode, before prefill."""
    if spec["kind"] == "torch":  # the floor of any torch runtime, however lean
        return {"peak_rss": peak_rss_bytes()}
    if spec["kind"] == "runtime":  # the imports alone: what every variant pays before its weights
        import transformers  # noqa: F401

        import core.checkpoint  # noqa: F401

        return {"peak_rss": peak_rss_bytes()}
    if spec["kind"] == "skeleton":  # + the model's code (config, modules on meta) and its tokenizer
        return {"peak_rss": skeleton_rss(spec["folder"])}
    t0 = time.perf_counter()
    if spec["kind"] == "dense":
        from core.models import load_model

        loaded = load_model(spec.get("model", "demo"), dtype=getattr(torch, spec["dtype"]))
    else:
        from core.checkpoint import load_quantized

        loaded = load_quantized(spec["folder"])
    load_s = time.perf_counter() - t0
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer("The history of the city begins in the", return_tensors="pt").input_ids
    decode_steps(model, prompt, 4)  # warm-up (first calls allocate, load the kernel library)
    steps = decode_steps(model, prompt, spec["new_tokens"])
    rss = peak_rss_bytes()
    median = sorted(steps)[len(steps) // 2]
    result = {"load_s": load_s, "decode_median": 1 / median, "decode_total": len(steps) / sum(steps),
              "peak_rss": rss}
    if spec["prefill"]:
        result["prefill"] = spec["prefill"] / prefill_seconds(model, spec["prefill"], model.config.vocab_size)
    return result


def skeleton_rss(folder: str) -> int:
    """Peak RSS with the model's transformers code imported, its modules built without weights and
    its tokenizer loaded: everything a variant pays besides its tensors and activations."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import core.checkpoint  # noqa: F401

    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    AutoTokenizer.from_pretrained(folder)
    return peak_rss_bytes()


def run_worker(spec: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench.cpu_inference", "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the kernel's two paths


def crossover(rows_list=(1, 2, 4, 8, 12, 16, 32)) -> list[tuple]:
    """(bits, shape, rows, mat-vec us, dequantize+GEMM us, fp32 F.linear us) on demo-sized layers."""
    from cuda_ext import cpu
    from core.packing import pack_codes

    results = []
    for bits in (5, 4, 3):
        for in_f, out_f in ((576, 1536), (1536, 576)):
            q = pack_codes(torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8), bits)
            lut = torch.randn(out_f, 1 << bits).half()
            dense = torch.randn(out_f, in_f)
            for rows in rows_list:
                x = torch.randn(rows, in_f)
                t = [_best_us(lambda: cpu.lut_matmul(x, q, lut, bits, in_f, None, None, None, None, 64)),
                     _best_us(lambda: cpu.lut_matmul(x, q, lut, bits, in_f, None, None, None, None, 0)),
                     _best_us(lambda: torch.nn.functional.linear(x, dense))]
                results.append((bits, (in_f, out_f), rows, *t))
    return results


def _best_us(fn, repeats: int = 7, inner: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


# ---------------------------------------------------------------- report


THREE_BIT = ("3-bit dense-only", "3-bit dense-and-sparse (0.45% + 0.05%)")


def memory_floor_lines(results: dict[str, dict], torch_rss: int, skeleton: int) -> list[str]:
    """What the 3-bit models' peak would be as a share of fp32's in a runtime that imported nothing but
    torch and loaded no tokenizer: the same tensors and activations above a floor of ``torch_rss``."""
    fp32_above = results["fp32 original"]["peak_rss"] - skeleton
    shares = [(torch_rss + results[label]["peak_rss"] - skeleton) / (torch_rss + fp32_above)
              for label in THREE_BIT if label in results]
    if not shares:
        return []
    low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
    return [f"The runtime dominates at this size: even a chat program that imported nothing but torch "
            f"({format_mib(torch_rss)}) and carried the same tensors and activations would put the 3-bit models at "
            f"{low if low == high else low + '-' + high} of the fp32 original's peak, so 40% is out of reach for a "
            "135 M-parameter model in any torch process; the memory at 1.1 B parameters is in the scale section."]


def load_line() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def format_mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def markdown(results: dict[str, dict], runtime: tuple[int, int, int], cross: list[tuple], args,
             loads: tuple[str, str]) -> str:
    base = results["fp32 original"]
    torch_rss, runtime_rss, skeleton = runtime
    lines = [
        "## CPU inference: decode, prefill and memory of the demo model", "", machine_line(), "",
        f"All variants measured in one run, each in its own process, {args.rounds} interleaved rounds keeping each "
        f"variant's best speeds (the torch-reference row: one round) ({loads[0]} before, {loads[1]} after; absolute numbers drift with load, the "
        "ratios are the point). "
        f"Decode: greedy, KV cache, batch 1, {args.new_tokens} new tokens after a 9-token prompt; tok/s from the "
        f"median step (and from the total time). Prefill: one {args.prefill}-token forward, best of two. Peak RSS: "
        f"VmHWM after loading and decoding (the chat case); `import torch` alone takes {format_mib(torch_rss)}, "
        f"the Python + torch + transformers imports {format_mib(runtime_rss)}, and {format_mib(skeleton)} with the model's transformers code imported, "
        "its modules built without weights and its tokenizer loaded (what every variant pays besides its tensors "
        "and activations); the last column subtracts that. Quantized models are loaded from their saved folders "
        "(core.checkpoint.load_quantized, tensors memory-mapped); their tied token embedding and lm_head are "
        f"one table of {quant_config(4, True).embed_bits}-bit lookup-table codes (the default, core.embed_head).", "",
        *memory_floor_lines(results, torch_rss, skeleton), "",
        "| model | decode tok/s | x fp32 | prefill tok/s | x fp32 | peak RSS | % of fp32 | above code + tokenizer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['decode_median']:.1f} ({r['decode_total']:.1f}) | "
            f"{r['decode_median'] / base['decode_median']:.2f} | {r['prefill']:.0f} | "
            f"{r['prefill'] / base['prefill']:.2f} | {format_mib(r['peak_rss'])} | "
            f"{100 * r['peak_rss'] / base['peak_rss']:.0f}% | {format_mib(r['peak_rss'] - skeleton)} |")
    lines += ["", "Kernel paths on one layer (microseconds per call, best of 7; fp16 LUT, no sparse part; "
              "F.linear on a dense fp32 weight that stays in cache, unlike in the model). Rows up to "
              "`cuda_ext.cpu.MAX_MATVEC_ROWS` take the mat-vec path:", "",
              "| bits | in x out | rows | mat-vec | dequantize + GEMM | fp32 F.linear |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {b} | {s[0]} x {s[1]} | {r} | {mv:.0f} | {gm:.0f} | {fp:.0f} |" for b, s, r, mv, gm, fp in cross]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every variant (best speeds kept; the torch-reference row runs once)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow torch-reference row")
    parser.add_argument("--crossover-only", action="store_true", help="only time the kernel's two paths")
    parser.add_argument("--workdir", type=Path, default=None, help="where the quantized folders are cached")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import cuda_ext

    if not cuda_ext.is_available("cpu"):
        sys.exit(f"the CPU kernel is unavailable: {cuda_ext.unavailable_reason('cpu')}")
    cross = crossover()
    for row in cross:
        print("bits %d %s rows %2d: mat-vec %7.0f us, dequantize+GEMM %7.0f us, fp32 %7.0f us" % row)
    if args.crossover_only:
        return
    from cuda_ext.jit import cache_root

    workdir = args.workdir or cache_root().parent.parent / "bench"
    folders = quantized_folders(workdir)
    common = {"new_tokens": args.new_tokens, "prefill": args.prefill}
    specs = {label: ({"kind": "dense", "dtype": str(dtype).removeprefix("torch."), **common}, None)
             for label, dtype in DENSE.items()}
    specs.update({label: ({"kind": "quantized", "folder": str(folder), **common}, None)
                  for label, folder in folders.items()})
    if not args.skip_reference:
        specs[REFERENCE] = ({"kind": "quantized", "folder": str(folders[REFERENCE_OF]), **common},
                            {"SQUEEZE_KERNELS": "torch"})
    before = load_line()
    runtime = (run_worker({"kind": "torch"})["peak_rss"], run_worker({"kind": "runtime"})["peak_rss"],
               run_worker({"kind": "skeleton", "folder": str(folders[REFERENCE_OF])})["peak_rss"])
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for label, (spec, env) in specs.items():
            if label == REFERENCE and round_ > 0:  # 40x slower than the rest, and only there for scale
                continue
            result = run_worker(spec, env)
            print(f"round {round_ + 1} {label}: {result} ({load_line()})", flush=True)
            best = results.setdefault(label, result)
            for key in ("decode_median", "decode_total", "prefill"):
                best[key] = max(best[key], result[key])
            best["peak_rss"] = max(best["peak_rss"], result["peak_rss"])
    text = markdown(results, runtime, cross, args, (before, load_line()))
    update_section("cpu", text)
    print(text)


if __name__ == "__main__":
    main()
