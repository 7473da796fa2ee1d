"""Refinement's channel groups (QuantConfig.refine_groups) on the demo model: one group against a few.

python -m bench.refine_groups [--samples 32] [--groups 1 4] [--bits 3]

Rows, all dense-only (no outliers, no sensitive weights) with the embedding and head kept in float16, on
the same calibration windows and the same evaluation windows (EvalConfig: 40 x 512 tokens of the built-in
text, as bench/accuracy.py): k-means alone, then k-means refined (``--refine lnq``) with each group count.
Every row is one streaming run (``squeeze quantize demo``, bench.accuracy.run_stream_row) with the usual
cache: a row whose Fisher and H are cached from an earlier run with the same windows skips the calibration
pass (its forward and backward seconds are then "cached"); H of G groups is cached apart from H of one
group, so a G-group row's backward seconds are the Fisher with G Hessians per matrix. The layer objective Σ eᵀHe after refinement is given as
a fraction of the k-means solution's under the row's own H (G groups: each group of rows under its own H).
Writes bench/results/refine_groups.json and the "refine-groups" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.report import current_commit, machine_line, update_section
from core.config import CalibrationConfig, EvalConfig, OutlierConfig, QuantConfig

RESULTS = Path(__file__).resolve().parent / "results" / "refine_groups.json"
ACCURACY = Path(__file__).resolve().parent / "results" / "accuracy.json"  # its fp32 row: the same windows


def config_for(bits: int, groups: int | None) -> QuantConfig:
    """Dense-only at ``bits``, embedding and head in float16; refined with ``groups`` (None: k-means alone)."""
    return QuantConfig(bits=bits, outliers=OutlierConfig(percent=None), sensitivity_percent=0, embed_bits=16,
                       head_bits=16, refine=groups is not None, refine_groups=groups or 1)


def hessian_bytes_per_block(groups: int) -> int:
    """The memory plan's H of one demo block at ``groups`` (core.memory_plan counts G x in x in float32)."""
    from core.lazy_model import LazyModel
    from core.memory_plan import plan_for
    from core.models import demo_model_dir

    return plan_for(LazyModel.open(demo_model_dir()), 1, 512, refine=True, refine_groups=groups).hessians


def run(bits: int, groups: list[int], calibration: CalibrationConfig) -> list[dict]:
    from bench.accuracy import run_stream_row
    from core.data import corpus_tokens, evaluation_windows
    from core.models import load_model

    eval_cfg = EvalConfig()
    tokenizer = load_model("demo").tokenizer
    windows = evaluation_windows(corpus_tokens(tokenizer, eval_cfg.source), eval_cfg.windows, eval_cfg.seqlen)
    rows = []
    for g in [*groups, None]:  # k-means alone last: its Fisher is cached by then
        name = f"squeezellm {bits}-bit dense-only" + ("" if g is None else f", refined (lnq), {g} group"
                                                      + ("s" if g > 1 else ""))
        load_before = os.getloadavg()[0]
        row = run_stream_row(name, config_for(bits, g), windows, calibration)
        row["load"] = [load_before, os.getloadavg()[0]]
        row["groups"] = g
        if g is not None:
            row["hessian_bytes_per_block"] = hessian_bytes_per_block(g)
        rows.append(row)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"commit": current_commit(), "calibration_windows": calibration.samples,
                                       "rows": rows}, indent=1))
    return rows


def table(rows: list[dict], fp32: float | None) -> str:
    """One line per row: perplexity, share of k-means's gap to fp32 removed, objective after / before,
    calibration pass seconds (forward, backward), refinement seconds (summed over the matrix threads), the
    quantize step's wall seconds, and refinement's H per block."""
    plain = next((r["perplexity"] for r in rows if r.get("groups") is None), None)
    lines = ["| setting | perplexity | k-means's gap to fp32 removed | objective after / before | forward s "
             "| backward s | refine s (thread sum) | quantize s (wall) | H per block | load before / after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r["seconds"]
        gap = f"{(plain - r['perplexity']) / (plain - fp32):.0%}" if fp32 and plain and r.get("groups") else "-"
        ratio = "-"
        if r.get("objective"):
            ratio = f"{sum(a for _, _, a in r['objective']) / sum(b for _, b, _ in r['objective']):.3f}"
        h = f"{r['hessian_bytes_per_block'] / 2**20:.0f} MiB" if r.get("hessian_bytes_per_block") else "-"
        passes = " | ".join(f"{s[k]:.0f}" if k in s else "cached" for k in ("forward", "backward"))
        refine = f"{s['refine']:.0f}" if "refine" in s else "-"
        load = " / ".join(f"{v:.1f}" for v in r["load"]) if r.get("load") else "not recorded"
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {gap} | {ratio} | {passes} | {refine} "
                     f"| {s.get('quantize', 0):.0f} | {h} | {load} |")
    return "\n".join(lines)


def write_section(data: dict) -> None:
    rows = data["rows"]
    fp32 = None
    if ACCURACY.exists():
        fp32 = next((r["perplexity"] for r in json.loads(ACCURACY.read_text()) if r["name"].startswith("fp32")), None)
    reference = f"{fp32:.2f}" if fp32 is not None else "not in bench/results/accuracy.json"
    text = (f"## Refinement's channel groups\n\n{machine_line()}, commit {data['commit']}\n\n"
            f"`python -m bench.refine_groups`: the demo model, dense-only, embedding and head in float16, calibration "
            f"from {data['calibration_windows']} x 512-token windows of the built-in corpus (the same for every row), "
            f"perplexity on the 40 x 512 evaluation windows of the accuracy section (fp32: {reference}). A row "
            "whose Fisher and H were cached by an earlier run with these windows skips the calibration pass "
            "('cached'); 'backward' holds the Fisher and, when refining, the gradient-weighted H (G groups: one H "
            "per group of contiguous output rows, cached apart from one group's). The "
            "objective is Σ eᵀHe summed over the matrices after refinement over k-means's, under the row's own "
            "H.\n\n" + table(rows, fp32) + (f"\n\n{data['note']}" if data.get("note") else ""))
    update_section("refine-groups", text)
    print(table(rows, fp32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4], help="group counts to refine with")
    parser.add_argument("--bits", type=int, default=3, choices=(3, 4))
    parser.add_argument("--from-json", action="store_true", help="measure nothing: rewrite the section from "
                                                                 "bench/results/refine_groups.json")
    args = parser.parse_args()
    if not args.from_json:
        run(args.bits, args.groups, CalibrationConfig(samples=args.samples))
    write_section(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
