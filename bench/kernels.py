"""CUDA LUT kernels against fp16 cuBLAS: time per call, effective GB/s, batch crossover, decode tokens/s.

python -m bench.kernels [--bits 3 4] [--batches 1 4 8 64 512] [--new-tokens 64] [--layers 32] [--skip-e2e]
                        [--json FILE]
python -m bench.kernels --from-json FILE      (writes the section from a run's saved numbers, no GPU needed)

Needs an NVIDIA GPU and the built CUDA kernels (cuda_ext.ops); without them it prints why and
exits with status 2, writing nothing: every number it writes was measured in the same run.
``--json`` keeps the run's raw numbers (a GPU is often a lent machine whose files do not stay), and
``--from-json`` writes the section from them later.

* Layers: LLaMA-7B (4096x4096, 11008x4096, 4096x11008) and LLaMA-70B (8192x8192, 28672x8192)
  shapes as [out, in], random 3/4-bit codes, fp16 LUT, with and without a 0.5% CSR residual
  (the paper's 0.45% + 0.05%), against torch.matmul on the fp16 weight. Each timing replays a
  CUDA graph of many calls (so launch overhead from Python is not counted), cycling through
  enough weight copies to overflow the L2 cache (so weights really come from DRAM). Effective
  GB/s = bytes the call must move (packed codes + LUT + CSR, or the fp16 weight, plus the
  activations in and out) / time, and its share of the peak DRAM bandwidth.
* Crossover: mat-vec (in chunks of 8 rows) vs dequantize + cuBLAS per row count on the 7B
  shapes, to set cuda_ext.ops.DEQUANTIZE_MIN_ROWS.
* The two mat-vecs (split-K and one-kernel) on the same weights at 1, 4 and 8 rows, with and
  without a residual: what the op's routing (one kernel for a single row) rests on.
* End to end: greedy decode (batch 1, KV cache) of a Llama-3.1-8B-shaped model with random fp16
  weights, then of the same model with every decoder Linear replaced by a random SqueezeLinear,
  run through core with SQUEEZE_KERNELS=cuda; tokens/s from the median step (transformers' eager
  loop: launch-bound on a fast GPU). Beside it, the time of one token's decoder Linears (all 224
  of them, batch 1) replayed from a CUDA graph: what the weights themselves cost per token.

Writes the "cuda-kernels" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench.report import machine_line, update_section

SHAPES = {"7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
          "70B q/o": (8192, 8192), "70B gate/up": (28672, 8192)}
BATCHES = (1, 4, 8, 64, 512)
SPARSE_FRACTION = 0.005
CROSSOVER_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def gpu_missing() -> str | None:
    """Why nothing can be measured here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    import cuda_ext

    if not cuda_ext.is_available("cuda"):
        return f"the CUDA kernels are unavailable: {cuda_ext.unavailable_reason('cuda')}"
    return None


def peak_bandwidth_gbs() -> float | None:
    """Theoretical DRAM bandwidth from the device properties (double data rate), if torch reports them."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy: (read + write bytes) / time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / replay_time_us([lambda: dst.copy_(src)], per_replay=5) / 1e3


def replay_time_us(calls: list, per_replay: int, repeats: int = 5) -> float:
    """Microseconds per call: ``per_replay`` calls (cycling through ``calls``) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # warm-up: lazy init, cuBLAS handles and workspaces outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_replay):
            calls[i % len(calls)]()
    graph.replay()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / per_replay)
    del graph
    return best


def copies_for(nbytes: int) -> int:
    """Weight copies so that one pass over them moves at least 4x the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(64, math.ceil(4 * l2 / nbytes)))


def random_packed(out_features: int, in_features: int, bits: int, sparse_fraction: float) -> dict:
    """Random packed weights on the GPU (speed does not depend on the values)."""
    from core.packing import dense_to_csr, pack_codes

    codes = torch.randint(0, 1 << bits, (out_features, in_features), dtype=torch.uint8, device="cuda")
    lut = torch.randn(out_features, 1 << bits, device="cuda").sort(dim=1).values.mul_(0.02).half()
    parts = dict(qweight=pack_codes(codes, bits), lookup_table=lut, sparse_rows=None, sparse_cols=None,
                 sparse_vals=None)
    if sparse_fraction > 0:
        mask = torch.rand(out_features, in_features, device="cuda") < sparse_fraction
        rows, cols, vals = dense_to_csr(torch.randn(out_features, in_features, device="cuda"), mask)
        parts.update(sparse_rows=rows, sparse_cols=cols, sparse_vals=vals)
    return parts


def weight_bytes(parts: dict) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values() if t is not None)


def lut_call(parts: dict, x: torch.Tensor, bits: int, in_features: int):
    from cuda_ext import ops

    return lambda: ops.lut_matmul(x, parts["qweight"], parts["lookup_table"], bits, in_features,
                                  parts["sparse_rows"], parts["sparse_cols"], parts["sparse_vals"])


def layer_table(bits_list, batches) -> list[dict]:
    rows = []
    for label, (out_f, in_f) in SHAPES.items():
        dense = [torch.randn(in_f, out_f, device="cuda", dtype=torch.float16)
                 for _ in range(copies_for(2 * in_f * out_f))]
        for batch in batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            act_bytes = 2 * batch * (in_f + out_f)
            fp16_us = replay_time_us([lambda w=w: x @ w for w in dense], per_replay=4 * len(dense))
            row = dict(shape=label, dims=(out_f, in_f), batch=batch, fp16_us=fp16_us,
                       fp16_gbs=(2 * in_f * out_f + act_bytes) / fp16_us / 1e3)
            for bits in bits_list:
                for fraction in (0.0, SPARSE_FRACTION):
                    copies = [random_packed(out_f, in_f, bits, fraction)]
                    copies += [random_packed(out_f, in_f, bits, fraction)
                               for _ in range(copies_for(weight_bytes(copies[0])) - 1)]
                    us = replay_time_us([lut_call(p, x, bits, in_f) for p in copies], per_replay=4 * len(copies))
                    key = f"{bits}b{'+s' if fraction else ''}"
                    row[f"{key}_us"] = us
                    row[f"{key}_gbs"] = (weight_bytes(copies[0]) + act_bytes) / us / 1e3
                    del copies
            rows.append(row)
            print(f"{label} batch {batch}: fp16 {fp16_us:.1f} us, " +
                  ", ".join(f"{k[:-3]} {v:.1f} us" for k, v in row.items() if k.endswith("_us") and k != "fp16_us"),
                  flush=True)
        del dense
        torch.cuda.empty_cache()
    return rows


def crossover(bits_list) -> list[tuple]:
    """(bits, shape, rows, mat-vec us, dequantize + GEMM us) for the 7B shapes."""
    results = []
    for bits in bits_list:
        for label, (out_f, in_f) in list(SHAPES.items())[:3]:
            first = random_packed(out_f, in_f, bits, 0.0)
            copies = [first] + [random_packed(out_f, in_f, bits, 0.0)
                                for _ in range(copies_for(weight_bytes(first)) - 1)]
            weights = [(p["qweight"], p["lookup_table"], bits, in_f, None, None, None) for p in copies]
            for rows in CROSSOVER_ROWS:
                x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
                gemv = replay_time_us([lambda w=w: torch.ops.squeeze_cuda.lut_gemv(x, *w, None) for w in weights],
                                      per_replay=2 * len(weights))
                gemm = replay_time_us([lambda w=w: x @ torch.ops.squeeze_cuda.lut_dequantize(*w, torch.float16)
                                       for w in weights], per_replay=2 * len(weights))
                results.append((bits, label, rows, gemv, gemm))
            del copies, weights
    return results


AB_SHAPES = {"7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008)}
AB_BATCHES = (1, 4, 8)


def gemv_ab(bits_list) -> list[tuple]:
    """(shape, bits, sparse fraction, rows, split-K us, one-kernel us): the two mat-vecs on the same weights.

    The op picks the one-kernel mat-vec for single rows unless SQUEEZE_CUDA_GEMV=v1; here both
    serve every row count (SQUEEZE_CUDA_GEMV=fused-all), so the routing can be checked against them.
    """
    results = []
    previous = os.environ.get("SQUEEZE_CUDA_GEMV")
    try:
        for label, (out_f, in_f) in AB_SHAPES.items():
            for bits in bits_list:
                for fraction in (0.0, SPARSE_FRACTION):
                    first = random_packed(out_f, in_f, bits, fraction)
                    copies = [first] + [random_packed(out_f, in_f, bits, fraction)
                                        for _ in range(copies_for(weight_bytes(first)) - 1)]
                    for rows in AB_BATCHES:
                        x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
                        calls = [lambda p=p: torch.ops.squeeze_cuda.lut_gemv(
                            x, p["qweight"], p["lookup_table"], bits, in_f, p["sparse_rows"], p["sparse_cols"],
                            p["sparse_vals"], None) for p in copies]
                        times = {}
                        for mode in ("v1", "fused-all"):
                            os.environ["SQUEEZE_CUDA_GEMV"] = mode
                            times[mode] = replay_time_us(calls, per_replay=4 * len(calls))
                        results.append((label, bits, fraction, rows, times["v1"], times["fused-all"]))
                    del copies
    finally:
        os.environ.pop("SQUEEZE_CUDA_GEMV") if previous is None else os.environ.update(SQUEEZE_CUDA_GEMV=previous)
    return results


# ---------------------------------------------------------------- end to end


# Llama-3.1-8B's shapes (its real vocabulary: the fp16 head is 1 GB of reads per token)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, rope_theta=500000.0)


def llama_8b_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **LLAMA_8B)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # initialise in fp16 directly: no 32 GB fp32 detour
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def replace_with_random_squeeze(model, bits: int, sparse_fraction: float) -> None:
    """Every decoder Linear (or SqueezeLinear) becomes a random SqueezeLinear of the same shape."""
    from core.layers import SqueezeLinear
    from core.models import quantizable_linears

    targets = {name: module for name, module in model.named_modules() if isinstance(module, SqueezeLinear)}
    targets = targets or quantizable_linears(model)
    for name, module in targets.items():
        parts = random_packed(module.out_features, module.in_features, bits, sparse_fraction)
        nnz = 0 if parts["sparse_vals"] is None else parts["sparse_vals"].numel()
        layer = SqueezeLinear(module.in_features, module.out_features, bits, nnz=nnz, device="cuda")
        layer.load_state_dict({k: v for k, v in parts.items() if v is not None}, strict=False)
        model.set_submodule(name, layer)
    torch.cuda.empty_cache()


@torch.inference_mode()
def decoder_linears_us(model) -> float:
    """Microseconds for one token (batch 1) through every decoder Linear, from a CUDA-graph replay."""
    from core.layers import SqueezeLinear

    linears = [m for m in model.model.layers.modules() if isinstance(m, (torch.nn.Linear, SqueezeLinear))]
    inputs = {m.in_features: torch.randn(1, m.in_features, device="cuda", dtype=torch.float16) for m in linears}
    calls = [lambda m=m: m(inputs[m.in_features]) for m in linears]
    return replay_time_us(calls, per_replay=len(calls)) * len(calls)


@torch.inference_mode()
def decode_tokens_per_s(model, new_tokens: int) -> float:
    """Greedy decode, batch 1, KV cache, after a 16-token prompt; tokens/s of the median step."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    steps = []
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    for i in range(new_tokens + 4):
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=next_id, past_key_values=out.past_key_values, use_cache=True)
        torch.cuda.synchronize()
        if i >= 4:  # the first steps allocate and load the kernels
            steps.append(time.perf_counter() - t0)
    return 1 / sorted(steps)[len(steps) // 2]


def end_to_end(bits_list, layers: int, new_tokens: int) -> list[tuple]:
    """(variant, decode tokens/s, peak GiB allocated, decoder Linears us per token from a graph)."""
    results = []
    torch.cuda.reset_peak_memory_stats()
    model = llama_8b_shaped(layers)
    results.append(("fp16 (torch.matmul)", decode_tokens_per_s(model, new_tokens),
                    torch.cuda.max_memory_allocated() / 2**30, decoder_linears_us(model)))
    print(f"decode fp16: {results[-1][1]:.1f} tok/s, linears {results[-1][3]:.0f} us/token", flush=True)
    previous = os.environ.get("SQUEEZE_KERNELS")
    os.environ["SQUEEZE_KERNELS"] = "cuda"
    try:
        for bits in bits_list:
            for fraction in (0.0, SPARSE_FRACTION):
                replace_with_random_squeeze(model, bits, fraction)
                torch.cuda.reset_peak_memory_stats()
                label = f"{bits}-bit " + ("dense-only" if not fraction else f"dense-and-sparse ({fraction:.1%})")
                tokens_per_s = decode_tokens_per_s(model, new_tokens)
                results.append((label, tokens_per_s, torch.cuda.max_memory_allocated() / 2**30,
                                decoder_linears_us(model)))
                print(f"decode {label}: {tokens_per_s:.1f} tok/s, linears {results[-1][3]:.0f} us/token", flush=True)
    finally:
        os.environ.pop("SQUEEZE_KERNELS") if previous is None else os.environ.update(SQUEEZE_KERNELS=previous)
    return results


# ---------------------------------------------------------------- report


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def layer_markdown(rows: list[dict], bits_list, peak: float | None) -> list[str]:
    head = "| shape [out, in] | batch | fp16 cuBLAS us (GB/s) |"
    rule = "|---|---:|---:|"
    for bits in bits_list:
        head += f" {bits}-bit us | speedup vs fp16 | GB/s{' (% peak)' if peak else ''} | {bits}-bit +0.5% sparse us |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['shape']} {r['dims'][0]}x{r['dims'][1]} | {r['batch']} | {r['fp16_us']:.1f} ({r['fp16_gbs']:.0f}) |"
        for bits in bits_list:
            gbs = r[f"{bits}b_gbs"]
            share = f" ({100 * gbs / peak:.0f}%)" if peak else ""
            line += (f" {r[f'{bits}b_us']:.1f} | {r['fp16_us'] / r[f'{bits}b_us']:.2f}x | {gbs:.0f}{share} |"
                     f" {r[f'{bits}b+s_us']:.1f} |")
        lines.append(line)
    return lines


def target_lines(rows: list[dict], bits_list, peak: float | None) -> list[str]:
    """The issue's targets, checked against this run's numbers."""
    seven_b = [r for r in rows if r["shape"].startswith("7B")]
    lines = []
    for bits, target in ((3, 3.0), (4, 2.5)):
        if bits not in bits_list:
            continue
        at_1 = [r["fp16_us"] / r[f"{bits}b_us"] for r in seven_b if r["batch"] == 1]
        if at_1:
            lines.append(f"- {bits}-bit, batch 1, 7B shapes: slowest speedup over fp16 {min(at_1):.2f}x "
                         f"(target >= {target}x): {'met' if min(at_1) >= target else 'NOT met'}")
        if peak and at_1:
            share = min(r[f"{bits}b_gbs"] for r in seven_b if r["batch"] == 1) / peak
            lines.append(f"- {bits}-bit, batch 1, 7B shapes: lowest bandwidth {100 * share:.0f}% of peak "
                         f"(target >= 70%): {'met' if share >= 0.7 else 'NOT met'}")
        at_512 = [r[f"{bits}b_us"] / r["fp16_us"] for r in rows if r["batch"] == 512]
        if at_512:
            lines.append(f"- {bits}-bit, batch 512: worst time {max(at_512):.2f}x fp16 (target <= 1.2x): "
                         f"{'met' if max(at_512) <= 1.2 else 'NOT met'}")
    return lines


def crossover_markdown(results: list[tuple], threshold: int) -> list[str]:
    lines = ["| bits | shape | " + " | ".join(f"{r} rows" for r in CROSSOVER_ROWS) + " |",
             "|---|---|" + "---:|" * len(CROSSOVER_ROWS)]
    first_gemm_wins = []
    for bits, label in dict.fromkeys((b, s) for b, s, *_ in results):
        cells = [(rows, gemv, gemm) for b, s, rows, gemv, gemm in results if (b, s) == (bits, label)]
        lines.append(f"| {bits} | {label} | " + " | ".join(f"{g:.0f} / {m:.0f}" for _, g, m in cells) + " |")
        wins = [rows for rows, gemv, gemm in cells if gemm < gemv]
        first_gemm_wins.append(min(wins) if wins else None)
    measured = max((w for w in first_gemm_wins if w is not None), default=None)
    lines += ["", "Cells: mat-vec us / dequantize + GEMM us. From "
              + (f"**{measured} rows** on, dequantize + GEMM wins on every shape measured"
                 if measured and None not in first_gemm_wins else "no row count measured does dequantize + GEMM "
                 "win on every shape")
              + f"; cuda_ext.ops.DEQUANTIZE_MIN_ROWS was {threshold} in this run."]
    return lines


def markdown(run: dict) -> str:
    """The section, from a run's numbers (``measure``'s dict, or the same read back from --json)."""
    bits_list, peak, e2e, args = run["bits"], run["peak_gbs"], run["e2e"], run["args"]
    lines = ["## CUDA kernels: LUT mat-vec and dequantize + GEMM against fp16 cuBLAS", "", run["machine"], "",
             f"GPU: {run['gpu']}, CUDA {run['cuda']}, torch {run['torch']}; peak DRAM bandwidth "
             f"{f'{peak:.0f} GB/s (from the device properties)' if peak else 'not reported'}, measured copy "
             f"{run['copy_gbs']:.0f} GB/s. All numbers from one run of `python -m bench.kernels` "
             f"(commit {run['commit']}).", "",
             "### Per layer", "",
             "Time per call from CUDA-graph replays (no Python launch overhead), cycling through weight copies "
             "that overflow the L2 cache; random codes, fp16 LUT and activations. GB/s: bytes the call must move "
             "(packed codes + LUT, or the fp16 weight, plus activations) / time.", ""]
    lines += layer_markdown(run["layers"], bits_list, peak) + ["", "Targets (issue 19):", ""]
    lines += target_lines(run["layers"], bits_list, peak)
    if run.get("ab"):
        lines += ["", "### The two mat-vecs on the same weights (7B shapes, fp16 activations)", "",
                  "Split-K (blocks over the inputs add into a float32 buffer: zero, mat-vec, CSR residual and cast, "
                  "four launches) against the one-kernel mat-vec (a block owns 32 outputs over all inputs; residual, "
                  "bias and cast in the same kernel). Cells: split-K us / one-kernel us.", "",
                  "| shape | bits | residual | " + " | ".join(f"{r} rows" for r in AB_BATCHES) + " |",
                  "|---|---:|---|" + "---:|" * len(AB_BATCHES)]
        cells: dict = {}
        for label, bits, fraction, rows, split_k, fused in run["ab"]:
            cells.setdefault((label, bits, fraction), {})[rows] = (split_k, fused)
        for (label, bits, fraction), by_rows in cells.items():
            lines.append(f"| {label} | {bits} | {'0.5%' if fraction else 'none'} | " + " | ".join(
                f"{by_rows[r][0]:.1f} / {by_rows[r][1]:.1f}" if r in by_rows else "-" for r in AB_BATCHES) + " |")
    if run.get("note"):
        lines += ["", run["note"]]
    if run["crossover"]:
        lines += ["", "### Batch crossover (7B shapes, dense-only)", ""]
        lines += crossover_markdown([tuple(c) for c in run["crossover"]], run["threshold"])
    if e2e:
        base, base_linears = e2e[0][1], e2e[0][3]
        lines += ["", f"### End-to-end decode, Llama-3.1-8B-shaped model ({args['layers']} layers, random weights)",
                  "", f"Greedy, batch 1, KV cache, {args['new_tokens']} tokens after a 16-token prompt; tokens/s of "
                  "the median step in transformers' eager loop; quantized layers through core.kernels with "
                  "SQUEEZE_KERNELS=cuda, embedding and head fp16. Decoder Linears: one token through all of them "
                  "(batch 1) replayed from a CUDA graph, so launch overhead is not counted.", "",
                  "| model | decode tok/s | x fp16 | decoder Linears us/token | x fp16 | peak GiB allocated |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {label} | {tps:.1f} | {_ratio(tps, base)} | {us:.0f} | {_ratio(base_linears, us)} | {gib:.1f} |"
                  for label, tps, gib, us in e2e]
    return "\n".join(lines)


def measure(args) -> dict:
    """Every number of one run, with what describes the run."""
    from bench.report import current_commit
    from cuda_ext import ops

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    run = dict(machine=machine_line(), gpu=props.name, cuda=torch.version.cuda, torch=torch.__version__,
               commit=current_commit(), bits=args.bits, threshold=ops.DEQUANTIZE_MIN_ROWS,
               args=dict(layers=args.layers, new_tokens=args.new_tokens, batches=args.batches),
               peak_gbs=peak_bandwidth_gbs(), copy_gbs=copy_bandwidth_gbs())
    run["layers"] = layer_table(args.bits, args.batches)
    _save(args.json, run)
    run["crossover"] = [] if args.skip_crossover else crossover(args.bits)
    _save(args.json, run)
    run["ab"] = [] if args.skip_ab else gemv_ab(args.bits)
    _save(args.json, run)
    run["e2e"] = [] if args.skip_e2e else end_to_end(args.bits, args.layers, args.new_tokens)
    _save(args.json, run)
    return run


def _save(path, run: dict) -> None:
    """The numbers so far (a run cut short by its time limit still leaves what it measured)."""
    if path is not None:
        import json

        Path(path).write_text(json.dumps(run, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4], choices=[2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B-shaped model")
    parser.add_argument("--skip-e2e", action="store_true", help="layers and crossover only")
    parser.add_argument("--skip-crossover", action="store_true")
    parser.add_argument("--skip-ab", action="store_true", help="no split-K against one-kernel mat-vec table")
    parser.add_argument("--json", type=Path, default=None, help="also keep the raw numbers in this file")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="write the section from a file an earlier run kept (no GPU needed)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        import json

        run = json.loads(args.from_json.read_text())
        run.setdefault("crossover", [])
        run.setdefault("e2e", [])
    else:
        missing = gpu_missing()
        if missing:
            print(f"bench.kernels needs an NVIDIA GPU with the CUDA kernels built: {missing}. "
                  "Nothing was measured and BENCHMARKS.md is unchanged.")
            return 2
        run = measure(args)
    text = markdown(run)
    update_section("cuda-kernels", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
