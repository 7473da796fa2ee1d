"""The streaming section of BENCHMARKS.md: the targets of issue 14 judged from the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

from bench.big_models import SHAPES as BIG_SHAPES
from bench.streaming_probe import by_size, probe_lines
from bench.streaming_worker import CALIBRATION_STAGES, NOT_STAGES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "streaming.json"
SIZES = ("1.1b", "3b", "8b")
HALF_DEPTH = "1.1b-11"  # TinyLlama-1.1B's width with half its blocks: how peak memory grows with depth
SHAPES = (*SIZES, HALF_DEPTH)
WHOLE_BYTES_PER_PARAMETER = 12  # fp32 weights + their fp32 gradients + the fp32 Fisher sums
GB = 1e9
# targets of issue 14
ANON_TARGET_8B, HWM_TARGET_8B = 10 * GB, 16 * GB
WINDOW_RATIO_TARGET = 1.3
DEPTH_TARGET = 0.25  # growth beyond the added block inputs, as a share of the added blocks' bf16 bytes
LINEAR_TARGET = 1.5  # seconds per weight, largest size over smallest
LINEAR_MIN_SECONDS = 2.0  # stages shorter than this at the largest size are shown, not judged
PERPLEXITY_TOLERANCE = 0.005



def load_results(path: Path = RESULTS) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _done(results: dict, key: str) -> dict | None:
    row = results.get(key)
    return row if row and "stopped" not in row else None


def _streamed(results: dict) -> list[dict]:
    """The streamed rows of the three model shapes (not the half-depth one), smallest first."""
    rows = [r for k, r in results.items() if k.endswith("/stream") and k.split("/")[0] in ("tiny", *SIZES)
            and "stopped" not in r]
    return sorted(rows, key=lambda r: r["parameters"])


def target_8b(results: dict) -> str:
    row = results.get("8b/stream")
    head = (f"the 8 B-shaped model quantizes to completion with peak RssAnon under {ANON_TARGET_8B / GB:.0f} GB "
            f"and VmHWM under {HWM_TARGET_8B / GB:.0f} GB")
    if row is None:
        return f"{head}: **not measured yet**"
    if "stopped" in row:
        return f"{head}: **not met** ({row['stopped']})"
    anon, hwm = row["peak_rss_anon_mib"] * 2**20, row["vm_hwm_mib"] * 2**20
    met = anon < ANON_TARGET_8B and hwm < HWM_TARGET_8B
    return f"{head}: **{'met' if met else 'not met'}** ({anon / GB:.2f} GB RssAnon, {hwm / GB:.2f} GB VmHWM)"


def target_growth(results: dict) -> str:
    """Twice the blocks at the same width: the peak may grow by the added block inputs, not by weights."""
    half, full = _done(results, f"{HALF_DEPTH}/stream"), _done(results, "1.1b/stream")
    head = (f"peak memory grows by a block, not with the model (TinyLlama-1.1B's width with 11 and with 22 "
            f"blocks: met when the peak RssAnon grows by less than the added blocks' inputs kept in RAM plus "
            f"{DEPTH_TARGET:.0%} of the added blocks' bf16 bytes; a path holding the model in bf16 grows by "
            f"100%, the whole-model path by ~{WHOLE_BYTES_PER_PARAMETER / 2:.0f}00%)")
    sizes = ", ".join(f"{r['bytes_per_parameter']:.2f} at {r['parameters'] / 1e9:.2f} B" for r in _streamed(results))
    if not (half and full) or half.get("commit") != full.get("commit"):
        return f"{head}: **not measured yet** (both depths from one build); bytes per parameter {sizes}"
    grown = (full["peak_rss_anon_mib"] - half["peak_rss_anon_mib"]) * 2**20
    added = full["parameters"] - half["parameters"]
    _, shape = BIG_SHAPES[HALF_DEPTH]
    added_blocks = BIG_SHAPES["1.1b"][1]["num_hidden_layers"] - shape["num_hidden_layers"]
    added_inputs = added_blocks * full["samples"] * full["seqlen"] * shape["hidden_size"] * 4  # float32, in RAM
    slack = DEPTH_TARGET * 2 * added
    met = grown < added_inputs + slack
    return (f"{head}: **{'met' if met else 'not met'}** (grew {grown / 2**20:,.0f} MiB for {added / 1e9:.2f} B "
            f"added parameters: {added_inputs / 2**20:,.0f} MiB of added block inputs, the added blocks are "
            f"{2 * added / 2**20:,.0f} MiB in bf16); bytes per parameter {sizes}")


def target_window(results: dict) -> str:
    head = f"seconds per calibration window within {WINDOW_RATIO_TARGET}x of the whole-model path"
    for size in ("tiny", *SIZES):
        stream, whole = _done(results, f"{size}/stream"), _done(results, f"{size}/whole")
        if stream and whole:
            ratio = stream["seconds_per_window"] / whole["seconds_per_window"]
            return (f"{head} at {stream['label']}: **{'met' if ratio <= WINDOW_RATIO_TARGET else 'not met'}** "
                    f"({stream['seconds_per_window']:.1f} s against {whole['seconds_per_window']:.1f} s: {ratio:.2f}x)")
    return f"{head}: **not measured yet**"


STAGE_ORDER = ("load", "fisher", "forward", "backward", "outliers", "split", "kmeans", "packing", "quantize", "save")


def stage_names(rows: list[dict]) -> list[str]:
    """The stages any row reports, in the order a run goes through them (unknown ones last)."""
    names: list[str] = []
    for row in rows:
        names += [k for k in row.get("seconds", {}) if k not in names]
    return sorted(names, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))


def target_linear(results: dict) -> str:
    rows = _streamed(results)
    head = (f"every stage but the calibration pass linear in parameters (met when each stage's seconds per "
            f"weight at the largest size are within {LINEAR_TARGET}x of the smallest's; stages under "
            f"{LINEAR_MIN_SECONDS:.0f} s at the largest size are not judged)")
    if len(rows) < 2:
        return f"{head}: **not measured yet** (needs two streamed sizes)"
    small, large = rows[0], rows[-1]
    ratios = {}
    for name in stage_names([small, large]):
        if name in CALIBRATION_STAGES or name in NOT_STAGES or name not in small["seconds"] or name not in large["seconds"]:
            continue
        a, b = small["seconds"][name], large["seconds"][name]
        if b >= LINEAR_MIN_SECONDS and a > 0:
            ratios[name] = (b / large["parameters"]) / (a / small["parameters"])
    if not ratios:
        return f"{head}: **not measured yet** (no stage long enough)"
    met = all(r <= LINEAR_TARGET for r in ratios.values())
    listed = ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items())
    whole_runs = f"{small['label']} to {large['label']}: {listed}"
    probe = results.get("probe")
    if probe and len(probe.get("widths", {})) >= 2:
        (_, a), (_, b) = by_size(probe)
        probed = {k: b["per_million"][k] / a["per_million"][k] for k in a["per_million"]}
        judged = {**ratios, **probed}  # the probed stages from the probe, the others from the whole runs
        verdict = all(r <= LINEAR_TARGET for r in judged.values())
        return (f"{head}: **{'met' if verdict else 'not met'}**, the per-block stages judged by the one-process probe below ("
                + ", ".join(f"{k} {r:.2f}x" for k, r in probed.items())
                + f"); the whole runs, minutes to an hour apart on a shared machine: {whole_runs}")
    return f"{head}: **{'met' if met else 'not met'}** ({whole_runs})"


def target_perplexity(results: dict) -> str:
    stream, whole = _done(results, "demo/stream"), _done(results, "demo/whole")
    head = (f"the demo model's default run gives the same perplexity as the whole-model path (within "
            f"{PERPLEXITY_TOLERANCE:.1%})")
    if not (stream and whole and "perplexity" in stream and "perplexity" in whole):
        return f"{head}: **not measured yet**"
    diff = abs(stream["perplexity"] - whole["perplexity"]) / whole["perplexity"]
    return (f"{head}: **{'met' if diff <= PERPLEXITY_TOLERANCE else 'not met'}** ({stream['perplexity']:.3f} "
            f"against {whole['perplexity']:.3f} on {whole['eval_windows']} windows of 512 tokens, "
            f"{stream['samples']} calibration windows of {stream['seqlen']}, {stream['bits']}-bit)")


# ---------------------------------------------------------------- the section


def _mib(value: float) -> str:
    return f"{value:,.0f} MiB"


def _ordered(results: dict) -> list[tuple[str, dict]]:
    order = {size: i for i, size in enumerate(("tiny", HALF_DEPTH, *SIZES))}
    keys = [k for k in results if "/" in k and not k.startswith("demo/")]
    keys.sort(key=lambda k: (order.get(k.split("/")[0], 99), k.split("/")[1] != "whole"))
    return [(k, results[k]) for k in keys]


def _run_note(row: dict, latest: str) -> str:
    return "this run" if row.get("run") == latest else f"{row.get('run', '?')} ({row.get('commit', '?')})"


def memory_table(results: dict, latest: str) -> list[str]:
    lines = ["| model | parameters | mode | peak RssAnon | peak VmRSS | VmHWM | RssAnon bytes / parameter | "
             "seconds | s / window | load before / after | run |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for _, r in _ordered(results):
        start = f"| {r['label']} | {r['parameters'] / 1e9:.2f} B | {r['mode']} |"
        if "stopped" in r:
            lines.append(f"{start} {r['stopped']} | | | | | | {r.get('load', '')} | {_run_note(r, latest)} |")
            continue
        lines.append(f"{start} {_mib(r['peak_rss_anon_mib'])} | {_mib(r['peak_vm_rss_mib'])} | "
                     f"{_mib(r['vm_hwm_mib'])} | {r['bytes_per_parameter']:.2f} | {r['seconds']['total']:.0f} | "
                     f"{r['seconds_per_window']:.1f} | {r.get('load', '')} | {_run_note(r, latest)} |")
    return lines


def stage_table(results: dict) -> list[str]:
    rows = [r for _, r in _ordered(results) if "stopped" not in r]
    names = [n for n in stage_names(rows) if n not in NOT_STAGES]
    lines = ["| model | mode | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for r in rows:
        cells = []
        for name in names:
            s = r["seconds"].get(name)
            if s is None:
                cells.append("")
            elif name in CALIBRATION_STAGES:
                cells.append(f"{s:.1f}")
            else:
                cells.append(f"{s:.1f} ({s / (r['parameters'] / 1e6):.3f})")
        lines.append(f"| {r['label']} | {r['mode']} | " + " | ".join(cells) + " |")
    return lines


def whole_notes(results: dict, mem_total: int) -> list[str]:
    """Why the whole-model path has no row at some sizes, with its measured bytes per parameter."""
    measured = [r for k, r in results.items() if k.endswith("/whole") and not k.startswith("demo") and "stopped" not in r]
    seen = " (measured: " + ", ".join(f"{r['bytes_per_parameter']:.1f} at {r['label']}" for r in measured) + ")" \
        if measured else ""
    notes = []
    for key, r in results.items():
        size = key.split("/")[0]
        if key.endswith("/stream") and size != "demo" and f"{size}/whole" not in results:
            need = WHOLE_BYTES_PER_PARAMETER * r["parameters"]
            notes.append(f"{r['label']} ({need / GB:.0f} GB)")
    if not notes:
        return []
    return [f"The whole-model path is not run at {', '.join(notes)}: it holds about {WHOLE_BYTES_PER_PARAMETER} "
            f"bytes per parameter (the float32 weights, their gradients and the float32 Fisher sums){seen}, more "
            f"than 75% of this machine's {mem_total / GB:.1f} GB.", ""]


def demo_table(results: dict) -> list[str]:
    rows = [(m, _done(results, f"demo/{m}")) for m in ("whole", "stream")]
    if not any(r for _, r in rows):
        return []
    lines = ["The demo model's default run (SmolLM2-135M, 4-bit dense-and-sparse), both ways, perplexity of the "
             "saved folder:", "", "| demo run | perplexity | s / window | peak RssAnon | seconds |",
             "|---|---:|---:|---:|---:|"]
    for mode, r in rows:
        if r:
            mark = " *" if r.get("note") else ""
            lines.append(f"| {mode} | {r.get('perplexity', float('nan')):.3f} | {r['seconds_per_window']:.1f}{mark} | "
                         f"{_mib(r['peak_rss_anon_mib'])} | {r['seconds']['total']:.0f}{mark} |")
    notes = [f"\\* {mode}: {r['note']}." for mode, r in rows if r and r.get("note")]
    return lines + [""] + ([*notes, ""] if notes else [])


def markdown(results: dict, *, machine: str, latest: str, mem_total: int, quick: bool) -> str:
    any_row = next((r for _, r in _ordered(results) if "samples" in r), None)
    windows = f"{any_row['samples']} windows of {any_row['seqlen']} tokens" if any_row else "calibration windows"
    targets = [target_8b(results), target_growth(results), target_window(results), target_linear(results),
               target_perplexity(results)]
    lines = [
        "## Streaming quantization: memory and time from 1.1 B to 8 B parameters", "", machine, "",
        *(["**`--quick` smoke run**: a tiny random LLaMA and a 2-window demo run; the numbers only show the "
           "harness works.", ""] if quick else []),
        "Random-weight bfloat16 folders with the shapes of TinyLlama-1.1B (hidden 2048, 22 layers, 32 / 4 heads, "
        "intermediate 5632), Llama-3.2-3B (3072, 28 layers, 24 / 8 heads, 8192, tied embeddings) and Llama-3.1-8B "
        "(4096, 32 layers, 32 / 8 heads, 14336), all with the demo tokenizer's 49,152-token vocabulary "
        "(bench.big_models: N(0, 0.02) weights, seeded), each quantized 3-bit dense-and-sparse (0.45% + 0.05%) on "
        f"{windows} of the built-in corpus, every run in its own process with an empty Fisher cache. "
        "`stream` is the engine's public job (core.pipeline.run_quantize_job), `whole` today's whole-model "
        "path written out (float32 model, Fisher over every window, quantize, save). Peak RssAnon: the process's "
        "anonymous memory sampled every 0.2 s (memory-mapped weight pages are the page cache's, not counted); "
        "VmHWM: the kernel's peak resident set, mapped file pages included. Stage seconds are the engine's "
        "report (split and k-means are CPU-seconds summed over the worker threads); in brackets, seconds per "
        "million parameters; s / window = the calibration stages "
        f"({', '.join(CALIBRATION_STAGES)}) over the window count; load: the 1-minute load average when the run started and ended (the machine is "
        "shared: other work slows a run down, not its memory). GB = 10^9 bytes.", "",
        "Targets (issue 14), judged from the numbers below:", "",
        *[f"- {t}" for t in targets], "",
        *memory_table(results, latest), "", *stage_table(results), "", *probe_lines(results.get("probe", {})),
        *whole_notes(results, mem_total),
        *demo_table(results)]
    return "\n".join(lines).rstrip() + "\n"
