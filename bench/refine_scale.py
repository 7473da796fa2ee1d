"""How refinement's time scales: core.refine on matrices of a 1.1B-parameter LLaMA shape.

python -m bench.refine_scale [--folder DIR] [--rounds N]

Takes block 0's projections of a TinyLlama-1.1B-shaped folder (the random bf16 one bench/streaming
builds, or any LLaMA folder), a random positive H = XᵀX per matrix (4096 random tokens with input
scales drawn log-normal, so H is far from a multiple of the identity), a random Fisher, 3-bit
dense-only k-means, then ``refine_matrix`` with torch on one thread (as the quantizer's matrix pool
runs it). Prints seconds per matrix and the estimate for every block of the model on this machine's
cores; writes bench/results/refine_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "refine_scale.json"
DEFAULT = Path.home() / ".cache" / "squeeze-studio" / "bench" / "tinyllama-1.1b-shape-random-bf16"


def random_hessian(n: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.randn(n, generator=g).exp()
    return x.t() @ x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT)
    parser.add_argument("--rounds", type=int, default=None, help="default: core.refine.ROUNDS")
    parser.add_argument("--only", nargs="*", help="matrix short names (q_proj, k_proj, gate_proj, down_proj, ...)")
    args = parser.parse_args()
    from core.block_pass import block_linears
    from core.lazy_model import LazyModel
    from core.quantize import quantize_matrix
    from core.refine import ROUNDS, refine_matrix

    lazy = LazyModel.open(args.folder)
    block = lazy.load_block(0, "cpu")
    torch.set_num_threads(1)
    rows, seen = [], {}
    for name, lin in block_linears(lazy, 0).items():
        short = name.rsplit(".", 1)[-1]
        shape = tuple(lin.weight.shape)
        if (args.only and short not in args.only) or shape in seen.values():
            seen.setdefault(short, shape)
            continue
        seen[short] = shape
        w = lin.weight.float()
        fisher = torch.rand(w.shape, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        q = quantize_matrix(w, fisher, 3)
        kmeans = time.perf_counter() - t0
        _, stats = refine_matrix(w, fisher, q, random_hessian(w.shape[1]),
                                 rounds=ROUNDS if args.rounds is None else args.rounds)
        row = {"matrix": short, "shape": list(shape), "kmeans_seconds": kmeans, "refine_seconds": stats.seconds,
               "rounds": stats.rounds, "objective_ratio": stats.objective_after / stats.objective_before}
        rows.append(row)
        print(json.dumps(row), flush=True)
    by_shape = {tuple(r["shape"]): r["refine_seconds"] for r in rows}
    per_block = sum(by_shape.get(shape, 0.0) for shape in seen.values())
    cores = os.cpu_count() or 1
    summary = {"folder": str(args.folder), "blocks": len(lazy.blocks), "cores": cores, "matrices": rows,
               "refine_seconds_per_block_one_thread": per_block,
               "refine_seconds_whole_model_estimate": per_block * len(lazy.blocks) / cores}
    print(json.dumps({k: v for k, v in summary.items() if k != "matrices"}))
    RESULTS.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
