"""The token embedding and output head at 4, 6, 8 or 16 bits: perplexity against folder size on the demo model.

python -m bench.embed_head [--samples 4] [--windows 40] [--bits 3 4] [--widths 4 6 8 16] [--weighting]

Every row goes through the streaming engine (``squeeze quantize demo``, dense-and-sparse 0.45% + 0.05%)
into a temporary folder that is loaded and evaluated on the same evaluation windows (EvalConfig: the
built-in text, 512-token windows); the folder's bytes on disk are the whole file. The demo model's
embedding and head are one tied matrix, stored once at the given width. ``--weighting`` adds rows on an
untied copy of the demo (lm_head a copy of the embedding) comparing an untied embedding weighted by token
frequency in the calibration text with an unweighted one. Writes bench/results/embed_head.json and the
"embed-head" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, update_section
from core.config import CalibrationConfig, EvalConfig, QuantConfig
from core.progress import run_to_end

RESULTS = Path(__file__).resolve().parent / "results" / "embed_head.json"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_row(name: str, model: str, config: QuantConfig, calibration: CalibrationConfig, windows) -> dict:
    from core.checkpoint import load_quantized
    from core.evaluate import perplexity
    from core.pipeline import QuantizeJob, run_quantize_job

    with tempfile.TemporaryDirectory(prefix="squeeze-embed-head-") as tmp:
        output = Path(tmp) / "q"
        t0 = time.perf_counter()
        report = run_to_end(run_quantize_job(QuantizeJob(model=model, output=output, config=config,
                                                         calibration=calibration, device="cpu")))
        seconds = time.perf_counter() - t0
        size = folder_bytes(output)
        weights = sum(f.stat().st_size for f in output.glob("*.safetensors"))
        loaded = load_quantized(output).model
        result = run_to_end(perplexity(loaded, windows, batch_size=4))
    row = {"name": name, "bits": config.bits, "embed_bits": config.embed_bits, "head_bits": config.head_bits,
           "embed_weighting": config.embed_weighting, "folder_bytes": size, "weights_bytes": weights,
           "perplexity": result.perplexity, "quantize_seconds": seconds,
           "embed_head_seconds": report.seconds.get("quantize")}
    print(json.dumps(row), flush=True)
    return row


def untied_demo(folder: Path) -> Path:
    """The demo model with its head a copy of the embedding and tie_word_embeddings false."""
    import torch

    from core.models import load_model

    loaded = load_model("demo")
    model = loaded.model
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def table(rows: list[dict], fp32: float | None) -> str:
    lines = ["| projections | embedding / head | folder (MB, whole) | perplexity | vs fp32 |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        pair = f"{r['embed_bits']} / {r['head_bits']} bits" + ("" if r["name"].startswith("tied") else
                                                             f", untied, embedding weighted: {r['embed_weighting']}")
        rel = f"{r['perplexity'] / fp32:.3f}x" if fp32 else "-"
        lines.append(f"| {r['bits']}-bit dense-and-sparse | {pair} | {r['folder_bytes'] / 1e6:.1f} "
                     f"| {r['perplexity']:.2f} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (default 4)")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens (default 40)")
    parser.add_argument("--bits", type=int, nargs="*", default=[3, 4], help="projection widths (default 3 4)")
    parser.add_argument("--widths", type=int, nargs="*", default=[4, 6, 8, 16],
                        help="embedding / head widths (default 4 6 8 16)")
    parser.add_argument("--weighting", action="store_true",
                        help="also compare frequency-weighted and unweighted untied embeddings (4-bit)")
    args = parser.parse_args()
    from core.data import corpus_tokens, evaluation_windows
    from core.evaluate import perplexity
    from core.models import load_model

    eval_cfg = EvalConfig(windows=args.windows)
    calibration = CalibrationConfig(samples=args.samples)
    loaded = load_model("demo")
    windows = evaluation_windows(corpus_tokens(loaded.tokenizer, eval_cfg.source), eval_cfg.windows, eval_cfg.seqlen)
    fp32 = run_to_end(perplexity(loaded.model, windows, batch_size=4)).perplexity
    print(json.dumps({"fp32": fp32}), flush=True)
    del loaded
    rows = []
    for bits in args.bits:
        for width in args.widths:
            config = QuantConfig(bits=bits, embed_bits=width, head_bits=width)
            rows.append(run_row(f"tied {bits}/{width}", "demo", config, calibration, windows))
            _save(rows, fp32, args)
    if args.weighting:
        with tempfile.TemporaryDirectory(prefix="squeeze-untied-demo-") as tmp:
            folder = untied_demo(Path(tmp) / "untied")
            for bits in args.bits:
                for weighting in ("frequency", "none"):
                    config = QuantConfig(bits=bits, embed_bits=4, head_bits=16, embed_weighting=weighting)
                    rows.append(run_row(f"untied {bits}/{weighting}", str(folder), config, calibration, windows))
                    _save(rows, fp32, args)


def _save(rows: list[dict], fp32: float, args) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"fp32": fp32, "samples": args.samples, "windows": args.windows, "rows": rows},
                                  indent=1))
    command = "python -m bench.embed_head " + " ".join(
        [f"--samples {args.samples}", f"--windows {args.windows}", "--bits " + " ".join(map(str, args.bits)),
         "--widths " + " ".join(map(str, args.widths))] + (["--weighting"] if args.weighting else []))
    text = "\n".join([
        "## Embedding and head", "", machine_line(), "",
        f"`{command}`: the demo model (SmolLM2-135M, 49152 x 576 tied embedding and head) quantized by the "
        f"streaming engine with a {args.samples}-window Fisher (the head's rows weighted by the head weight's "
        f"Fisher), perplexity on {args.windows} windows of 512 tokens of the built-in text (fp32: {fp32:.2f}); "
        "folder = every file of the quantized folder on disk (the whole file). 16 bits = float16 as before.", "",
        table(rows, fp32)])
    update_section("embed-head", text)


if __name__ == "__main__":
    main()
