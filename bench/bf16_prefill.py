"""bfloat16 prefill on the CPU: the kernel's float32 path against the bfloat16 GEMM, per layer and end to end.

python -m bench.bf16_prefill [--rows 8 16 32 64 128 256 512] [--windows 20] [--samples 8] [--skip-demo]

* Layers (LLaMA-8B and demo shapes, random 3-bit codes with a 0.5% residual, bf16 activations): seconds
  per call of core.kernels.lut_matmul with ``BF16_GEMM_MIN_ROWS`` set past the row count (the CPU
  kernel's float32 dequantize + GEMM) and at its default (the bf16 GEMM from that many rows on), the
  two timed alternately, best of 3, in one process.
* Demo model: stored in bfloat16 (so its quantized folder keeps norms and embedding in bf16 and the
  activations are bf16, as with a bf16 checkpoint), quantized 4-bit with ``--samples`` windows
  (embedding and head float16), then evaluated on ``--windows`` x 512 tokens both ways: perplexity
  and seconds.

Writes the "bf16-prefill" section of BENCHMARKS.md and bench/results/bf16_prefill.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.report import current_commit, machine_line, update_section

RESULTS = Path(__file__).resolve().parent / "results" / "bf16_prefill.json"
SHAPES = {"8B q/o 4096x4096": (4096, 4096), "8B gate/up 14336x4096": (14336, 4096),
          "8B down 4096x14336": (4096, 14336), "demo gate/up 1536x576": (1536, 576)}


@contextmanager
def bf16_gemm(enabled: bool):
    from core import kernels

    saved = kernels.BF16_GEMM_MIN_ROWS
    kernels.BF16_GEMM_MIN_ROWS = saved if enabled else 1 << 40
    try:
        yield
    finally:
        kernels.BF16_GEMM_MIN_ROWS = saved


def random_layer(out_features: int, in_features: int, bits: int = 3) -> dict:
    from core.packing import dense_to_csr, pack_codes

    codes = torch.randint(0, 1 << bits, (out_features, in_features), dtype=torch.uint8)
    lut = (torch.randn(out_features, 1 << bits).sort(1).values * 0.02).half()
    rows, cols, vals = dense_to_csr(torch.randn(out_features, in_features) * 0.05,
                                    torch.rand(out_features, in_features) < 0.005)
    return dict(qweight=pack_codes(codes, bits), lookup_table=lut, bits=bits, in_features=in_features,
                sparse_rows=rows, sparse_cols=cols, sparse_vals=vals, bias=None)


def layer_rows(row_counts: list[int]) -> list[dict]:
    from core import kernels

    results = []
    for label, (out_f, in_f) in SHAPES.items():
        w = random_layer(out_f, in_f)
        for rows in row_counts:
            x = torch.randn(rows, in_f).bfloat16()
            best = {True: float("inf"), False: float("inf")}
            for _ in range(3):
                for enabled in (False, True):
                    with bf16_gemm(enabled):
                        t0 = time.perf_counter()
                        kernels.lut_matmul(x, **w)
                        best[enabled] = min(best[enabled], time.perf_counter() - t0)
            results.append(dict(shape=label, rows=rows, float32_s=best[False], bf16_s=best[True]))
            print(f"{label}, {rows} rows: float32 path {best[False] * 1e3:.0f} ms, bf16 GEMM {best[True] * 1e3:.0f} ms",
                  flush=True)
    return results


def demo_rows(windows: int, samples: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.checkpoint import load_quantized
    from core.config import CalibrationConfig, EvalConfig, QuantConfig
    from core.evaluate import evaluate_model
    from core.models import demo_model_dir
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    with tempfile.TemporaryDirectory(prefix="bf16-prefill-") as tmp:
        source = Path(tmp) / "demo-bf16"
        AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.bfloat16).save_pretrained(source)
        AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(source)
        out = Path(tmp) / "q"
        job = QuantizeJob(model=str(source), output=out, config=QuantConfig(bits=4, embed_bits=16, head_bits=16),
                          calibration=CalibrationConfig(samples=samples), device="cpu")
        run_to_end(run_quantize_job(job))
        loaded = load_quantized(out)
        result = {"windows": windows, "samples": samples}
        for enabled in (False, True):
            with bf16_gemm(enabled):
                t0 = time.perf_counter()
                perplexity = run_to_end(evaluate_model(loaded, EvalConfig(windows=windows))).perplexity
                key = "bf16" if enabled else "float32"
                result[f"{key}_perplexity"], result[f"{key}_s"] = perplexity, time.perf_counter() - t0
            print(f"demo, {'bf16 GEMM' if enabled else 'float32 path'}: perplexity {perplexity:.4f} in "
                  f"{result[f'{key}_s']:.0f} s", flush=True)
        return result


def markdown(run: dict) -> str:
    lines = ["## bf16 prefill on the CPU: float32 kernel path against the bfloat16 GEMM", "", run["machine"], "",
             f"`python -m bench.bf16_prefill` (commit {run['commit']}). Random 3-bit layers with a 0.5% residual, "
             "bf16 activations, core.kernels.lut_matmul with the bf16 GEMM off (the CPU kernel's float32 dequantize "
             "+ GEMM) and on; best of 3, the two alternated.", "",
             "| layer | rows | float32 path ms | bf16 GEMM ms | speedup |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['rows']} | {r['float32_s'] * 1e3:.0f} | {r['bf16_s'] * 1e3:.0f} | "
              f"{r['float32_s'] / r['bf16_s']:.2f}x |" for r in run["layers"]]
    demo = run.get("demo")
    if demo:
        lines += ["", f"Demo model stored in bf16, quantized 4-bit ({demo['samples']} calibration windows, embedding "
                  f"and head float16), evaluated on {demo['windows']} x 512 tokens with bf16 activations: perplexity "
                  f"{demo['float32_perplexity']:.4f} on the float32 path in {demo['float32_s']:.0f} s, "
                  f"{demo['bf16_perplexity']:.4f} with the bf16 GEMM in {demo['bf16_s']:.0f} s "
                  f"({demo['float32_s'] / demo['bf16_s']:.2f}x faster, perplexity "
                  f"{100 * (demo['bf16_perplexity'] / demo['float32_perplexity'] - 1):+.2f}%)."]
    if run.get("note"):
        lines += ["", run["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--from-json", action="store_true", help="rewrite the section from the results file")
    args = parser.parse_args(argv)
    if args.from_json:
        run = json.loads(RESULTS.read_text())
    else:
        import cuda_ext

        if not cuda_ext.is_available("cpu"):
            print(f"the CPU kernel is unavailable ({cuda_ext.unavailable_reason('cpu')}): nothing to compare")
            return 2
        torch.manual_seed(0)
        run = dict(machine=machine_line(), commit=current_commit(), layers=layer_rows(args.rows))
        if not args.skip_demo:
            run["demo"] = demo_rows(args.windows, args.samples)
        RESULTS.write_text(json.dumps(run, indent=1))
    text = markdown(run)
    update_section("bf16-prefill", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
