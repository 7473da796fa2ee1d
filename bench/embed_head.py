"""The token embedding and output head at 4, 6, 8 or 16 bits: perplexity against folder size on the demo model.

python -m bench.embed_head [--samples 4] [--windows 16] [--bits 3 4] [--widths 4 6 8 16] [--weighting]

For each projection width the streaming engine (``squeeze quantize demo``, dense-and-sparse 0.45% + 0.05%,
embedding and head at 4 bits, so the head's Fisher is computed and cached) writes one folder. Each row
then takes that folder's projections, puts the original embedding and head back and quantizes them at
the row's width with ``core.embed_head.quantize_embed_head`` (the streaming engine's own step, with the
same inputs: the head Fisher of the same calibration pass from the block cache, the same calibration
windows, the run's outlier multiplier), or keeps them in float16 (16 bits, as before); the model is
saved with ``save_quantized``, loaded with ``load_quantized`` and evaluated on the same windows
(EvalConfig: the built-in text, 512-token windows). The folder bytes are every file on disk (the whole
file). The demo's embedding and head are one tied matrix, stored once at the given width. ``--weighting``
adds rows where the head is untied (a float16 copy of the embedding) and the embedding alone is
quantized at 4 bits, weighted by token frequency in the calibration text or unweighted. Writes
bench/results/embed_head.json and the "embed-head" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine_line, update_section
from core.config import CalibrationConfig, EvalConfig, QuantConfig
from core.progress import run_to_end

RESULTS = Path(__file__).resolve().parent / "results" / "embed_head.json"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def quantize_projections(bits: int, calibration: CalibrationConfig, output: Path) -> dict:
    """The streaming run every row of ``bits`` shares; returns its quantization_config block."""
    from core.checkpoint import read_quantization_config
    from core.pipeline import QuantizeJob, run_quantize_job

    config = QuantConfig(bits=bits, embed_bits=4, head_bits=4)
    t0 = time.perf_counter()
    run_to_end(run_quantize_job(QuantizeJob(model="demo", output=output, config=config, calibration=calibration,
                                            device="cpu", overwrite=True)))
    print(json.dumps({"projections": bits, "seconds": time.perf_counter() - t0}), flush=True)
    return read_quantization_config(output)


def head_fisher(calibration: CalibrationConfig) -> torch.Tensor:
    """The head weight's Fisher the streaming runs cached (core.sensitivity.BlockFisherCache)."""
    from core.lazy_model import folder_fingerprint
    from core.models import demo_model_dir
    from core.sensitivity import BlockFisherCache

    cache = BlockFisherCache(folder_fingerprint(demo_model_dir()), calibration, 0)
    if not cache.has_head():
        raise SystemExit("the head's Fisher is not in the cache: run with the Fisher cache enabled")
    return cache.get_head()


def original_pair(model, demo, untied: bool) -> None:
    """Put the demo's float32 embedding (and head: tied, or an untied copy) back into ``model``."""
    weight = demo.get_input_embeddings().weight.detach().clone()
    embedding = torch.nn.Embedding(*weight.shape, _weight=weight)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = torch.nn.Parameter(weight.clone()) if untied else embedding.weight
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = not untied


def run_row(name: str, projections: Path, block: dict, config: QuantConfig, fisher, windows_cal, eval_windows,
            demo, untied: bool = False) -> dict:
    from core.checkpoint import load_quantized, save_quantized
    from core.embed_head import quantize_embed_head
    from core.evaluate import perplexity

    loaded = load_quantized(projections)
    model = loaded.model
    original_pair(model, demo, untied)
    t0 = time.perf_counter()
    if config.embed_bits < 16 or config.head_bits < 16:
        quantize_embed_head(model, config, None if untied else fisher, windows_cal, block.get("range_multiplier"))
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="squeeze-embed-head-") as tmp:
        output = Path(tmp) / "q"
        settings = {key: block[key] for key in ("config", "calibration", "source_model", "range_multiplier",
                                                "bits_per_weight", "sparse_percent") if key in block}
        run_to_end(save_quantized(model, loaded.tokenizer, output, settings))
        size = folder_bytes(output)
        weights = sum(f.stat().st_size for f in output.glob("*.safetensors"))
        result = run_to_end(perplexity(load_quantized(output).model, eval_windows, batch_size=4))
    row = {"name": name, "bits": block["config"]["bits"], "embed_bits": config.embed_bits,
           "head_bits": config.head_bits, "untied": untied, "embed_weighting": config.embed_weighting,
           "folder_bytes": size, "weights_bytes": weights, "perplexity": result.perplexity,
           "embed_head_seconds": seconds}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], fp32: float | None, source_bytes: int | None) -> str:
    lines = ["| projections | embedding / head | folder (MB, whole) | perplexity | vs fp32 |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["untied"]:
            pair = f"untied: embedding {r['embed_bits']} bits weighted by {r['embed_weighting']}, head float16"
        else:
            pair = "tied, float16" if r["embed_bits"] == 16 else f"tied, {r['embed_bits']}-bit LUT codes"
        rel = f"{r['perplexity'] / fp32:.3f}x" if fp32 else "-"
        lines.append(f"| {r['bits']}-bit dense-and-sparse | {pair} | {r['folder_bytes'] / 1e6:.1f} "
                     f"| {r['perplexity']:.2f} | {rel} |")
    if source_bytes:
        lines.append(f"\nThe original as stored (float32 `model.safetensors`): {source_bytes / 1e6:.1f} MB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (default 4)")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens (default 16)")
    parser.add_argument("--bits", type=int, nargs="*", default=[3, 4], help="projection widths (default 3 4)")
    parser.add_argument("--widths", type=int, nargs="*", default=[4, 6, 8, 16],
                        help="embedding / head widths (default 4 6 8 16)")
    parser.add_argument("--weighting", action="store_true",
                        help="also compare a frequency-weighted and an unweighted untied 4-bit embedding")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "squeeze-embed-head-bench",
                        help="where the shared projection folders go (kept for a rerun)")
    args = parser.parse_args()
    from core.data import calibration_windows, corpus_tokens, evaluation_windows
    from core.evaluate import perplexity
    from core.models import load_model

    eval_cfg = EvalConfig(windows=args.windows)
    calibration = CalibrationConfig(samples=args.samples)
    demo = load_model("demo")
    tokens = corpus_tokens(demo.tokenizer, eval_cfg.source)
    eval_windows = evaluation_windows(tokens, eval_cfg.windows, eval_cfg.seqlen)
    windows_cal = calibration_windows(corpus_tokens(demo.tokenizer, calibration.source), calibration.samples,
                                      calibration.seqlen, calibration.seed)
    fp32 = run_to_end(perplexity(demo.model, eval_windows, batch_size=4)).perplexity
    print(json.dumps({"fp32": fp32}), flush=True)
    rows = []
    for bits in args.bits:
        projections = args.work / f"demo-{bits}bit"
        block = quantize_projections(bits, calibration, projections)
        fisher = head_fisher(calibration)
        for width in args.widths:
            config = QuantConfig(bits=bits, embed_bits=width, head_bits=width)
            rows.append(run_row(f"tied {bits}/{width}", projections, block, config, fisher, windows_cal,
                                eval_windows, demo.model))
            _save(rows, fp32, args)
        if args.weighting and bits == args.bits[0]:
            for weighting in ("frequency", "none"):
                config = QuantConfig(bits=bits, embed_bits=4, head_bits=16, embed_weighting=weighting)
                rows.append(run_row(f"untied {bits}/{weighting}", projections, block, config, fisher, windows_cal,
                                    eval_windows, demo.model, untied=True))
                _save(rows, fp32, args)
    shutil.rmtree(args.work, ignore_errors=True)


def _save(rows: list[dict], fp32: float, args) -> None:
    from core.models import demo_model_dir

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"fp32": fp32, "samples": args.samples, "windows": args.windows, "rows": rows},
                                  indent=1))
    command = "python -m bench.embed_head " + " ".join(
        [f"--samples {args.samples}", f"--windows {args.windows}", "--bits " + " ".join(map(str, args.bits)),
         "--widths " + " ".join(map(str, args.widths))] + (["--weighting"] if args.weighting else []))
    source = sum(f.stat().st_size for f in demo_model_dir().glob("*.safetensors"))
    text = "\n".join([
        "## Embedding and head", "", machine_line(), "",
        f"`{command}`: the demo model (SmolLM2-135M, 49152 x 576 tied embedding and head) with its projections "
        f"quantized by the streaming engine ({args.samples}-window Fisher, dense-and-sparse 0.45% + 0.05%) and "
        "its embedding/head at each width (the head's rows weighted by the head weight's Fisher from the same "
        f"pass); perplexity on {args.windows} windows of 512 tokens of the built-in text (fp32: {fp32:.2f}); "
        "folder = every file of the quantized folder on disk (the whole file). 16 bits = float16 as before.", "",
        table(rows, fp32, source)])
    update_section("embed-head", text)


if __name__ == "__main__":
    main()
