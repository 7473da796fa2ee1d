"""Quality per byte against llama.cpp: the demo model's perplexity against its file size, llama.cpp's
K-quants (with an importance matrix) beside our SqueezeLLM folders, all scored by llama-perplexity.

python -m bench.llamacpp [--samples 100] [--only WORD ...] [--chunks N] [--skip-decode] [--from-json]

1. llama.cpp's tools are built once from llama-cpp-python's sdist (bench.llamacpp_tools).
2. The demo model in float32 becomes a GGUF with llama.cpp's own convert_hf_to_gguf.py (our exporter
   when that fails); llama-imatrix computes an importance matrix on the same calibration windows our
   Fisher uses (core.data: ``--samples`` windows of 512 tokens drawn from the later articles,
   decoded to text); llama-quantize makes Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M and IQ4_XS with it.
3. Our folders are quantized by the streaming engine (``squeeze quantize demo``) from the same
   windows and exported to GGUF float16 (exactly our dequantized weights).
4. Every GGUF is scored by llama-perplexity on one text: the evaluation tokens of core.data (the first
   40 x 512 tokens of the cleaned Wikipedia text) decoded, checked to tokenize back to the same ids
   in llama.cpp, ``-c 512``, 40 chunks. llama.cpp scores the second half of each chunk; our
   evaluator (every position) and our evaluator restricted to llama.cpp's positions stand beside it.
5. Size: a GGUF's bytes; for ours the folder's bytes on disk (what a user stores), not the export.
6. Decode tokens/s on this CPU: llama-bench tg128 for the GGUFs, bench.cpu_inference's decode
   (greedy, KV cache, 128 tokens) for our runtime on the folders.

Everything made is kept under ``cache_dir()/bench/llamacpp`` and reused; the numbers go to
bench/results/llamacpp.json, the "llamacpp" section of BENCHMARKS.md and docs/quality_per_byte.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "llamacpp.json"
PLOT = ROOT / "docs" / "quality_per_byte.png"
K_QUANTS = ("Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS")
DENSE_ONLY = {"outliers": {"percent": None}, "sensitivity_percent": 0.0}
HALF = {"embed_bits": 16, "head_bits": 16}  # the embedding/head in float16
SIX = {"embed_bits": 6, "head_bits": 6}  # ... as 6-bit LUT codes (core.embed_head)
FIVE = {"embed_bits": 5, "head_bits": 5}
OURS = {  # label -> QuantConfig fields
    "SqueezeLLM 4-bit dense-and-sparse": {"bits": 4, **HALF},
    "SqueezeLLM 3-bit dense-and-sparse, embedding 6-bit": {"bits": 3, **SIX},
    "SqueezeLLM 4-bit dense-and-sparse, embedding 6-bit": {"bits": 4, **SIX},
    # with gradient-weighted refinement of codes and tables (core.refine, --refine lnq)
    "SqueezeLLM 3-bit dense-and-sparse, refined, embedding 6-bit": {"bits": 3, "refine": True, **SIX},
    "SqueezeLLM 4-bit dense-only, refined, embedding 4-bit": {
        "bits": 4, **DENSE_ONLY, "refine": True, "embed_bits": 4, "head_bits": 4},
    "SqueezeLLM 4-bit dense-only, refined, embedding 6-bit": {"bits": 4, **DENSE_ONLY, "refine": True, **SIX},
    "SqueezeLLM 4-bit dense-and-sparse, refined, embedding 6-bit": {"bits": 4, "refine": True, **SIX},
    # the sparse part sized to Q3_K_M's file: outliers 0.2% (default 0.45%), sensitive weights 0.05%
    "SqueezeLLM 4-bit, outliers 0.2%, refined, embedding 6-bit": {
        "bits": 4, "outliers": {"percent": 0.2}, "refine": True, **SIX},
    "SqueezeLLM 4-bit, outliers 0.1%, refined, embedding 6-bit": {
        "bits": 4, "outliers": {"percent": 0.1}, "refine": True, **SIX},
    # 5-bit codes: llama.cpp's Q4_K_S / Q4_K_M store most of this model's projections as q5_0 (5.5 bits)
    "SqueezeLLM 5-bit dense-only, embedding 6-bit": {"bits": 5, **DENSE_ONLY, **SIX},
    "SqueezeLLM 5-bit dense-only, refined, embedding 6-bit": {"bits": 5, **DENSE_ONLY, "refine": True, **SIX},
    # ... within Q4_K_M's bytes: a 5-bit embedding (its 576-wide rows pay 64 B of table at 6 bits, 32 at 5),
    # or a quarter of the projections at 4 bits (mixed precision, the Fisher-weighted error decides which)
    "SqueezeLLM 5-bit dense-only, embedding 5-bit": {"bits": 5, **DENSE_ONLY, **FIVE},
    "SqueezeLLM 5-bit dense-only, refined, embedding 5-bit": {"bits": 5, **DENSE_ONLY, "refine": True, **FIVE},
    "SqueezeLLM 4.75-bit mixed (4 or 5), dense-only, embedding 6-bit": {"target_bits": 4.75, **DENSE_ONLY, **SIX},
    "SqueezeLLM 4.8-bit mixed (4 or 5), dense-only, refined, embedding 6-bit": {
        "target_bits": 4.8, **DENSE_ONLY, "refine": True, **SIX},
}
SEQLEN = 512
WINDOWS = 40
DECODE_TOKENS = 128


def work_dir() -> Path:
    from core.paths import cache_dir

    path = cache_dir() / "bench" / "llamacpp"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- our evaluator, llama.cpp's way


def second_half_perplexity(model, windows: torch.Tensor) -> float:
    """Perplexity over the positions llama-perplexity scores: in each window (int64 [n, ctx]) the
    logits at positions ctx/2 .. ctx-2 predicting the next token (ctx/2 - 1 tokens per window)."""
    return both_perplexities(model, windows)[1]


@torch.inference_mode()
def both_perplexities(model, windows: torch.Tensor) -> tuple[float, float]:
    """(core.evaluate's perplexity: the mean over windows of each window's mean next-token loss over
    every position, llama.cpp's: over positions ctx/2 .. ctx-2 of every window), one forward each."""
    import torch.nn.functional as F

    first = windows.shape[1] // 2
    means, half_total, half_count = [], 0.0, 0
    for window in windows:
        logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, window[1:], reduction="none").double()
        means.append(nll.mean().item())
        half_total += nll[first:].sum().item()
        half_count += nll[first:].numel()
    return math.exp(sum(means) / len(means)), math.exp(half_total / half_count)


# ---------------------------------------------------------------- texts


def write_text(path: Path, tokenizer, ids: list[int]) -> Path:
    path.write_text(tokenizer.decode(ids, clean_up_tokenization_spaces=False), encoding="utf-8")
    return path


def evaluation_text(tokenizer, tokens: torch.Tensor, work: Path, windows: int) -> tuple[Path, torch.Tensor]:
    """The text file llama-perplexity reads (the evaluation tokens and a few after them, so the
    last chunk's final token is not at the end of the file) and the windows [windows, 512]."""
    from core.data import evaluation_windows

    evaluation = evaluation_windows(tokens, windows, SEQLEN)
    return write_text(work / f"eval-{windows}.txt", tokenizer, tokens[: windows * SEQLEN + 64].tolist()), evaluation


def calibration_text(tokenizer, tokens: torch.Tensor, work: Path, samples: int) -> Path:
    """Our Fisher's calibration windows (core.data.calibration_windows, seed 0), decoded one after
    the other: llama-imatrix reads them back in chunks of 512."""
    from core.data import calibration_windows

    windows = calibration_windows(tokens, samples, SEQLEN, seed=0)
    return write_text(work / f"calibration-{samples}.txt", tokenizer, windows.reshape(-1).tolist())


# ---------------------------------------------------------------- llama.cpp's side


def run_logged(command: list, log: Path, env: dict | None = None) -> str:
    """Run ``command`` niced, its output to ``log``; the output (RuntimeError on failure)."""
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    result = subprocess.run([*nice, *map(str, command)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(str(command[0])).name} failed (exit {result.returncode}), see {log}:\n"
                           f"{(result.stdout + result.stderr)[-2000:]}")
    return result.stdout + result.stderr


def fp32_gguf(home: Path, work: Path) -> tuple[Path, str]:
    """The demo model in float32 as GGUF: llama.cpp's converter on our cached safetensors folder,
    or our exporter when the converter fails (offline, a version mismatch)."""
    from core.models import demo_model_dir

    out = work / "demo-f32.gguf"
    if out.is_file():
        return out, (work / "demo-f32.how").read_text()
    tmp = out.with_suffix(".partial")
    try:
        run_logged([sys.executable, home / "src" / "convert_hf_to_gguf.py", demo_model_dir(), "--outtype", "f32",
                    "--outfile", tmp], work / "convert.log", env={"HF_HUB_OFFLINE": "1"})
        how = "llama.cpp's convert_hf_to_gguf.py"
    except RuntimeError as exc:
        print(f"convert_hf_to_gguf.py failed, using our exporter: {exc}", flush=True)
        from core.interop.gguf_export import write_gguf
        from core.models import load_model
        from core.progress import run_to_end

        run_to_end(write_gguf(load_model("demo"), demo_model_dir(), tmp, torch.float32))
        how = "our exporter (convert_hf_to_gguf.py failed)"
    tmp.rename(out)
    (work / "demo-f32.how").write_text(how)
    return out, how


def importance_matrix(home: Path, model: Path, text: Path, samples: int, threads: int, work: Path) -> Path:
    out = work / f"imatrix-{samples}.gguf"
    if not out.is_file():
        t0 = time.perf_counter()
        run_logged([home / "bin" / "llama-imatrix", "-m", model, "-f", text, "-c", SEQLEN, "-b", SEQLEN,
                    "--chunks", samples, "-t", threads, "--no-escape", "-o", out.with_suffix(".partial.gguf")],
                   work / f"imatrix-{samples}.log")
        out.with_suffix(".partial.gguf").rename(out)
        print(f"importance matrix: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def k_quant(home: Path, model: Path, imatrix: Path, kind: str, work: Path) -> Path:
    out = work / f"demo-{kind}-{imatrix.stem}.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".partial")
        run_logged([home / "bin" / "llama-quantize", "--imatrix", imatrix, model, tmp, kind, os.cpu_count() or 2],
                   work / f"quantize-{kind}.log")
        tmp.rename(out)
    return out


QUANTIZE_LINE = re.compile(r"\]\s+(\S+\.weight)\s+- \[[^\]]*\], type =\s+(\S+),\s+(?:={6}[^\n]*\n)?"
                           r"(?:converting to (\S+)|size =)")  # a "did not find weights" line may come between


def tensor_types(log: str) -> dict[str, Counter]:
    """llama-quantize's choice per kind of tensor (attn_v, ffn_down, token_embd...) -> Counter of types."""
    kinds: dict[str, Counter] = defaultdict(Counter)
    for name, source, target in QUANTIZE_LINE.findall(log):
        kind = re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")
        kinds[kind][target or source] += 1
    return dict(kinds)


def llama_bench(home: Path, model: Path, work: Path) -> float:
    """Decode tokens/s (tg128, batch 1, this machine's cores) from llama-bench."""
    out = run_logged([home / "bin" / "llama-bench", "-m", model, "-p", 0, "-n", DECODE_TOKENS, "-r", 3,
                      "-t", os.cpu_count() or 2, "-o", "json"], work / f"bench-{model.stem}.log")
    return float(json.loads(out[out.index("["): out.rindex("]") + 1])[0]["avg_ts"])


# ---------------------------------------------------------------- our side


def our_folder(label: str, fields: dict, samples: int, work: Path) -> Path:
    """Quantize the demo with the streaming engine (cached by the settings)."""
    from core.config import CalibrationConfig, OutlierConfig, QuantConfig
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    key = hashlib.sha256(json.dumps([fields, samples], sort_keys=True).encode()).hexdigest()[:10]
    folder = work / f"ours-{re.sub(r'[^a-z0-9]+', '-', label.lower())}-{key}"
    if (folder / "config.json").is_file():
        return folder
    settings = dict(fields)
    if "outliers" in settings:
        settings["outliers"] = OutlierConfig(**settings["outliers"])
    t0 = time.perf_counter()
    run_to_end(run_quantize_job(QuantizeJob(model="demo", output=folder, config=QuantConfig(**settings),
                                            calibration=CalibrationConfig(samples=samples), device="cpu")))
    print(f"{label}: quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def our_gguf(folder: Path) -> Path:
    from core.interop.export import export_model
    from core.progress import run_to_end

    out = folder.with_name(folder.name + "-f16.gguf")
    if not out.is_file():
        run_to_end(export_model(folder, "gguf", out, dtype=torch.float16))
    return out


def our_decode(folder: Path | None) -> float:
    """Decode tokens/s of our runtime (a subprocess: bench.cpu_inference's worker, total over the steps)."""
    from bench.cpu_inference import run_worker

    spec = {"kind": "dense", "dtype": "float32"} if folder is None else {"kind": "quantized", "folder": str(folder)}
    return run_worker({**spec, "new_tokens": DECODE_TOKENS, "prefill": 0})["decode_total"]


# ---------------------------------------------------------------- the run


def measure(args) -> list[dict]:
    from bench.llamacpp_tools import ensure_tools, perplexity, token_ids
    from core.checkpoint import load_quantized
    from core.data import corpus_tokens
    from core.evaluate import size_on_disk
    from core.models import load_model

    work = work_dir()
    t0 = time.perf_counter()
    home = ensure_tools(log=lambda m: print(m, flush=True))
    print(f"llama.cpp tools: {home} ({time.perf_counter() - t0:.0f} s)", flush=True)
    demo = load_model("demo")
    tokens = corpus_tokens(demo.tokenizer, "builtin")
    text, windows = evaluation_text(demo.tokenizer, tokens, work, args.chunks)
    fp32, how = fp32_gguf(home, work)
    theirs_ids = token_ids(fp32, text, home)[: args.chunks * SEQLEN]
    same = theirs_ids == windows.reshape(-1).tolist()
    print(f"llama.cpp's tokens of the evaluation text equal ours: {same}", flush=True)
    if not same:
        raise SystemExit("llama.cpp tokenizes the evaluation text differently from our tokenizer: the "
                         "perplexities would not be on identical tokens")
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if (previous.get("chunks"), previous.get("samples")) != (args.chunks, args.samples):
        previous = {}  # rows measured on other text or calibration are not kept beside these
    old = {r["name"]: r for r in previous.get("rows", [])}
    types = previous.get("tensor_types", {})
    rows = []

    def wanted(name: str) -> bool:
        return not args.only or any(word.lower() in name.lower() for word in args.only)

    def score(name: str, family: str, gguf: Path, size: int, extra: dict) -> None:
        t1 = time.perf_counter()
        ppl, chunks = perplexity(gguf, text, SEQLEN, chunks=args.chunks, threads=args.threads, home=home)
        if chunks != args.chunks:
            raise SystemExit(f"llama-perplexity evaluated {chunks} chunks of {name}, not {args.chunks}")
        row = {"name": name, "family": family, "bytes": size, "llama_perplexity": ppl, **extra,
               "llama_perplexity_seconds": time.perf_counter() - t1}
        if not args.skip_decode:
            row["llama_decode"] = llama_bench(home, gguf, work)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def save() -> dict:
        result = {"samples": args.samples, "chunks": args.chunks, "tokens_identical": same, "converted_by": how,
                  "rows": rows, "tensor_types": types}
        RESULTS.write_text(json.dumps(result, indent=1))
        return result

    if wanted("fp32"):
        ours_all, ours_half = both_perplexities(demo.model, windows)
        extra = {"ours_perplexity": ours_all, "ours_second_half": ours_half, "converted_by": how}
        if not args.skip_decode:
            extra["ours_decode"] = our_decode(None)
        score("fp32 (llama.cpp GGUF F32)", "fp32", fp32, fp32.stat().st_size, extra)
    else:
        rows.extend(r for r in old.values() if r["family"] == "fp32")
    del demo
    calibration = calibration_text(load_model("demo").tokenizer, tokens, work, args.samples)
    imatrix = importance_matrix(home, fp32, calibration, args.samples, args.threads, work)
    for kind in K_QUANTS:
        name = f"llama.cpp {kind} + imatrix"
        if not wanted(name):
            rows.extend([old[name]] if name in old else [])
            continue
        gguf = k_quant(home, fp32, imatrix, kind, work)
        types[kind] = {k: dict(c) for k, c in tensor_types((work / f"quantize-{kind}.log").read_text()).items()}
        score(name, "llama.cpp", gguf, gguf.stat().st_size, {})
    for label, fields in OURS.items():
        if not wanted(label):
            rows.extend([old[label]] if label in old else [])
            continue
        folder = our_folder(label, fields, args.samples, work)
        extra = {"folder": folder.name, "gguf_bytes": our_gguf(folder).stat().st_size}
        if args.check_ours:
            extra["ours_perplexity"], extra["ours_second_half"] = both_perplexities(
                load_quantized(folder).model, windows)
        if not args.skip_decode:
            extra["ours_decode"] = our_decode(folder)
        score(label, "ours", our_gguf(folder), size_on_disk(folder), extra)
    return save()


# ---------------------------------------------------------------- report


def mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def table(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: r["bytes"])
    fp32 = next((r for r in rows if r["family"] == "fp32"), None)
    base = fp32["llama_perplexity"] if fp32 else None
    lines = ["| variant | file size (MB) | llama-perplexity | vs fp32 | our evaluator, llama.cpp's positions "
             "| our evaluator, every position | decode tok/s, llama.cpp | decode tok/s, our runtime |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['llama_perplexity'] / base:.3f}x" if base else "-"

        def cell(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if key in r else "-"

        lines.append(f"| {r['name']} | {mb(r['bytes'])} | {r['llama_perplexity']:.2f} | {rel} | "
                     f"{cell('ours_second_half')} | {cell('ours_perplexity')} | {cell('llama_decode', '{:.1f}')} | "
                     f"{cell('ours_decode', '{:.1f}')} |")
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """The issue's two targets, each met or not, with the numbers."""
    by_name = {r["name"]: r for r in result["rows"]}
    ours = [r for r in result["rows"] if r["family"] == "ours"]
    lines = []
    for kind in ("Q3_K_M", "Q4_K_M"):
        ref = by_name.get(f"llama.cpp {kind} + imatrix")
        if ref is None:
            continue
        fits = [r for r in ours if r["bytes"] <= ref["bytes"]]
        best = min(fits, key=lambda r: r["llama_perplexity"], default=None)
        if best is None:
            smallest = min(ours, key=lambda r: r["bytes"], default=None)
            lines.append(f"- at <= {kind}'s {mb(ref['bytes'])} MB: **not met**, none of our variants fits "
                         f"(smallest: {smallest['name']}, {mb(smallest['bytes'])} MB)" if smallest else "")
        else:
            met = best["llama_perplexity"] < ref["llama_perplexity"]
            lines.append(f"- at <= {kind}'s {mb(ref['bytes'])} MB (perplexity {ref['llama_perplexity']:.2f}): "
                         f"**{'met' if met else 'not met'}**, best of ours that fits is {best['name']} "
                         f"({mb(best['bytes'])} MB, {best['llama_perplexity']:.2f})")
    return lines


def types_note(result: dict) -> str:
    lines = []
    for kind in ("Q3_K_M", "Q4_K_M"):
        chosen = result.get("tensor_types", {}).get(kind)
        if not chosen:
            continue
        parts = [f"{name} {', '.join(f'{t} x{n}' if len(c) > 1 else t for t, n in c.items())}"
                 for name, c in sorted(chosen.items())]
        lines.append(f"- {kind}: " + "; ".join(parts))
    return "\n".join(lines)


def write_section(result: dict) -> None:
    from bench.report import machine_line, update_section

    fp32 = next((r for r in result["rows"] if r["family"] == "fp32"), None)
    agree = (f"On the fp32 model llama-perplexity gives {fp32['llama_perplexity']:.3f} and our evaluator "
             f"{fp32['ours_second_half']:.3f} on the same positions ({fp32['ours_perplexity']:.3f} over every "
             "position, the protocol of the other sections)." if fp32 and "ours_second_half" in fp32 else "")
    text = f"""## Quality per byte against llama.cpp

{machine_line()}

`python -m bench.llamacpp`: the demo model (SmolLM2-135M-Instruct) as llama.cpp's K-quants with an
importance matrix, and as our folders, all scored by llama.cpp's `llama-perplexity` on identical
tokens: the evaluation text ({result['chunks']} x 512 tokens of the cleaned Wikipedia text, the same
ids our evaluator uses: {'checked equal' if result['tokens_identical'] else 'NOT equal'} with
llama-tokenize), `-c 512`, {result['chunks']} chunks. llama.cpp scores the second half of each chunk
(256+ tokens of context), so its numbers sit below our evaluator's every-position ones. {agree}
llama.cpp's tools: built from llama-cpp-python {_tools_version()}'s vendored source; the F32 GGUF made
by {result['converted_by']}; importance matrix by llama-imatrix on our Fisher's {result['samples']}
calibration windows of 512 tokens. Ours: the streaming engine (`squeeze quantize demo`) on the
same windows, exported to GGUF float16 (exactly the dequantized weights) for llama-perplexity; their
size is the folder's bytes on disk, a GGUF's size its file. Decode: llama-bench tg{DECODE_TOKENS} on the
GGUF, our runtime's greedy decode of {DECODE_TOKENS} tokens on the folder (torch, our LUT kernels),
on this machine's {os.cpu_count()} cores shared with other work (ratios within a run are the point).

{table(result)}

Targets (issue 17):
{chr(10).join(targets(result))}

![perplexity against file size](docs/quality_per_byte.png)

llama-quantize's per-tensor choices (per kind of tensor, over the 30 blocks):
{types_note(result)}
"""
    update_section("llamacpp", text)


def _tools_version() -> str:
    from bench.llamacpp_tools import LLAMA_CPP_PYTHON_VERSION

    return LLAMA_CPP_PYTHON_VERSION


def plot(result: dict, path: Path = PLOT) -> None:
    """Perplexity against file size (MB), theirs and ours, fp32 as a line; a PNG via pyqtgraph.

    llama.cpp's points carry their kind below them; ours a number above, named in a key beside the plot
    (the names are too long to sit beside points a few MB apart)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    import pyqtgraph.exporters
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])  # the exporter draws with Qt
    pg.setConfigOptions(antialias=True, background="w", foreground="k")
    window = pg.GraphicsLayoutWidget()
    window.resize(1300, 620)
    item = window.addPlot(row=0, col=0)
    key = pg.LabelItem(justify="left")
    window.addItem(key, row=0, col=1)
    window.ci.layout.setColumnStretchFactor(0, 5)
    window.ci.layout.setColumnStretchFactor(1, 2)
    item.setLabel("bottom", "file size (MB): GGUF for llama.cpp, folder on disk for ours")
    item.setLabel("left", "perplexity (llama-perplexity, 40 x 512 tokens)")
    item.setTitle("SmolLM2-135M: quality per byte")
    item.addLegend(offset=(-10, 10))
    item.showGrid(x=True, y=True, alpha=0.3)
    colors = {"llama.cpp": (200, 80, 40), "ours": (30, 110, 200)}
    labels = {"llama.cpp": "llama.cpp K-quants + imatrix", "ours": "SqueezeLLM (ours)"}
    quantized = [r for r in result["rows"] if r["family"] != "fp32"]
    names = []
    for family, color in colors.items():
        rows = sorted((r for r in quantized if r["family"] == family), key=lambda r: r["bytes"])
        if not rows:
            continue
        item.plot([r["bytes"] / 1e6 for r in rows], [r["llama_perplexity"] for r in rows], pen=None,
                  symbol="o" if family == "ours" else "s", symbolSize=11, symbolBrush=color, symbolPen=color,
                  name=labels[family])
        for r in rows:
            if family == "ours":
                names.append(f"{len(names) + 1}. {r['name'].replace('SqueezeLLM ', '')}: "
                             f"{mb(r['bytes'])} MB, {r['llama_perplexity']:.2f}")
                text = pg.TextItem(str(len(names)), color=color, anchor=(0.5, 1.3))  # above the point
            else:
                text = pg.TextItem(r["name"].replace("llama.cpp ", "").replace(" + imatrix", ""), color=color,
                                   anchor=(0.5, -0.3))  # below
            text.setPos(r["bytes"] / 1e6, r["llama_perplexity"])
            item.addItem(text)
    key.setText("<b>ours</b> (file size, llama-perplexity)<br>" + "<br>".join(names), size="9pt",
                color=colors["ours"])
    fp32 = next((r for r in result["rows"] if r["family"] == "fp32"), None)
    if fp32:
        line = pg.InfiniteLine(pos=fp32["llama_perplexity"], angle=0,
                               pen=pg.mkPen((90, 90, 90), style=pg.QtCore.Qt.PenStyle.DashLine),
                               label=f"fp32 ({mb(fp32['bytes'])} MB): {fp32['llama_perplexity']:.2f}",
                               labelOpts={"position": 0.85, "color": (90, 90, 90)})
        item.addItem(line)
    item.getViewBox().setDefaultPadding(0.08)
    item.enableAutoRange()
    window.show()  # lays out the axes and titles before the export
    app.processEvents()
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = pg.exporters.ImageExporter(window.scene())
    exporter.parameters()["width"] = 1300
    exporter.export(str(path))
    window.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="calibration windows (Fisher and imatrix)")
    parser.add_argument("--chunks", type=int, default=WINDOWS, help="evaluation windows of 512 tokens")
    parser.add_argument("--only", nargs="*", help="measure only variants whose name contains one of these words")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of llama-perplexity and llama-imatrix (speed only; llama-bench and our "
                             "decode use every core)")
    parser.add_argument("--check-ours", action="store_true",
                        help="also score our folders with our evaluator (the fp32 model always is)")
    parser.add_argument("--skip-decode", action="store_true", help="leave out the decode speeds")
    parser.add_argument("--from-json", action="store_true", help="measure nothing: rewrite from the results")
    args = parser.parse_args(argv)
    result = json.loads(RESULTS.read_text()) if args.from_json else measure(args)
    write_section(result)
    plot(result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
