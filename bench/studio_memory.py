"""The studio's memory on a model bigger than half the machine: the real app, offscreen, on the 8 B folder.

python -m bench.studio_memory [--size 8b] [--phases model,inspect,original,quantized] [--blocks N]
                              [--windows 2 --seqlen 128 --tokens 8] [--screenshots DIR] [--no-report]

Drives the studio as a person would (studio.app.create_window, the pages' own buttons and fields) on
the random-weight Llama-3.1-8B-shaped bf16 folder of bench.big_models. Groups of phases (``--phases``):

- model: open the folder on the Model page (every other group but "quantized" opens it too);
- inspect: draw the histogram of one of its largest matrices on the Inspect page, compute the
  whole-model outlier statistics block by block (``--blocks N`` stops after N blocks with Cancel, as
  a person would; the default is all of them), then run them again from their on-disk cache;
- original: Evaluate the original on ``--windows`` windows of ``--seqlen`` tokens (the page loads it
  whole, in its stored dtype), then one Chat exchange with the same loaded model (greedy,
  ``--tokens`` new tokens);
- quantized: open the quantized folder (QUANTIZED_SUFFIX next to the shape folder, made once with
  ``quantize_command``) on the Model page, then the same Evaluate and Chat on it.

A thread samples this process's RssAnon and VmRSS every 0.1 s; the kernel's peak resident set (VmHWM,
mapped file pages included) is reset when each phase starts (/proc/self/clear_refs) and read when it
ends, so every phase has its own peak. The outlier-statistics cache and the studio's settings are a
fresh temporary folder, so the pass is computed, not read (the compiled CPU kernel is the user's, built
once per machine). ``--screenshots DIR`` saves the Model and
Inspect pages there as model-8b.png and inspect-8b.png (QWidget.grab()). Writes
bench/results/studio_memory.json (the phases of this run replace the same phases of earlier runs on
the same folder; each phase keeps the date and commit of its run) and the "studio-memory" section of
BENCHMARKS.md from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.app_driver import AppDriver
from bench.report import current_commit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "studio_memory.json"
TARGET_BYTES = 16 * 10**9  # issue 15: the studio stays under 16 GB throughout
OPEN_TARGET_SECONDS = 30
SAMPLE_SECONDS = 0.1
GROUPS = {
    "model": ("open",),
    "inspect": ("histogram", "statistics", "statistics from the cache", "screenshots"),
    "original": ("evaluate the original", "chat with the original"),
    "quantized": ("open the quantized", "evaluate the quantized", "chat with the quantized"),
}
QUANTIZED_SUFFIX = "-sq3"
# the embedding and head in float16, as bench.streaming's rows (6-bit codes would add a 201 M-weight table k-means)
QUANTIZE_SETTINGS = ["--bits", "3", "--samples", "2", "--seqlen", "64", "--embed-bits", "16", "--head-bits", "16"]
CHAT_PROMPT = "Name three colours."


def quantize_command(folder: Path) -> list[str]:
    """The command that makes the quantized folder once (random weights: a short calibration does)."""
    return ["squeeze", "quantize", str(folder), *QUANTIZE_SETTINGS, "-o", str(quantized_folder(folder))]


def quantized_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + QUANTIZED_SUFFIX)


def kernel_cache() -> Path:
    """The user's compiled-kernel folder (cuda_ext.jit), shared with the run's fresh cache folder: a
    user's kernel is built once per machine, not in the middle of their first evaluation."""
    from cuda_ext.jit import cache_root

    return cache_root().parent


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Start VmHWM again from the current resident set (Linux: clear_refs 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Peak RssAnon and VmRSS of this process per named phase; VmHWM reset when a phase starts."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.hwm_reset = reset_peak()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            time.sleep(SAMPLE_SECONDS)

    def sample(self) -> None:
        peaks = self.peaks.setdefault(self.phase, {"rss_anon": 0, "vm_rss": 0, "vm_hwm": 0})
        peaks["rss_anon"] = max(peaks["rss_anon"], status_bytes("RssAnon"))
        peaks["vm_rss"] = max(peaks["vm_rss"], status_bytes("VmRSS"))

    def enter(self, phase: str) -> None:
        """End the current phase (its VmHWM read) and start ``phase``."""
        self.sample()
        self.peaks[self.phase]["vm_hwm"] = status_bytes("VmHWM")
        self.phase = phase
        self.hwm_reset = reset_peak() and self.hwm_reset
        self.sample()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8b", help="a shape of bench.big_models: tiny, 1.1b, 3b, 8b")
    parser.add_argument("--workdir", type=Path, default=None, help="where bench.big_models wrote the folders")
    parser.add_argument("--phases", default=",".join(GROUPS),
                        help=f"comma-separated groups of phases to run, of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="cancel the outlier statistics after this many blocks (default: all)")
    parser.add_argument("--windows", type=int, default=2, help="Evaluate: windows of text")
    parser.add_argument("--seqlen", type=int, default=128, help="Evaluate: tokens per window")
    parser.add_argument("--tokens", type=int, default=8, help="Chat: new tokens of the reply (greedy)")
    parser.add_argument("--screenshots", type=Path, default=None, help="save model and inspect PNGs here")
    parser.add_argument("--size-px", default="1400x900", help="window size WxH for the screenshots")
    parser.add_argument("--no-report", action="store_true", help="print the results, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.phases.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        parser.error(f"--phases {args.phases!r}: use a comma-separated list of {', '.join(GROUPS)}")
    args.groups = [g for g in GROUPS if g in groups]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.big_models import LABELS, SHAPES, default_workdir

    folder = (args.workdir or default_workdir()) / SHAPES[args.size][0]
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} does not exist: build it first with python -m bench.big_models {args.size}")
    quantized = quantized_folder(folder)
    if "quantized" in args.groups and not (quantized / "config.json").is_file():
        raise SystemExit(f"{quantized} does not exist: make it first with {' '.join(quantize_command(folder))}")
    scratch = Path(tempfile.mkdtemp(prefix="studio-memory-"))
    os.environ["SQUEEZE_STUDIO_HOME"] = str(scratch / "home")
    kernels = kernel_cache()
    os.environ["SQUEEZE_CACHE_DIR"] = str(scratch / "cache")  # the statistics are computed, not read
    kernels.mkdir(parents=True, exist_ok=True)  # ... but the CPU kernel is the one built before
    (scratch / "cache").mkdir()
    (scratch / "cache" / "kernels").symlink_to(kernels)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sampler = Sampler()
    sampler.start()
    try:
        run = measure(folder, quantized, args, sampler)
    finally:
        sampler.stopped.set()
        shutil.rmtree(scratch, ignore_errors=True)
    run.update(model=LABELS[args.size], folder=str(folder))
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else None
    result = merge(previous, run)
    print(json.dumps(run, indent=1))
    if not args.no_report:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        from bench.report import update_section

        update_section("studio-memory", markdown(result))
    return 0


def merge(previous: dict | None, run: dict) -> dict:
    """``run``'s facts and phases over ``previous``'s phases (kept only when measured on the same folder)."""
    kept = previous.get("phases", {}) if previous and previous.get("folder") == run["folder"] else {}
    facts = {k: v for k, v in (previous or {}).items() if k != "phases"} if kept else {}
    return {**facts, **{k: v for k, v in run.items() if k != "phases"}, "phases": {**kept, **run["phases"]}}


def measure(folder: Path, quantized: Path, args: argparse.Namespace, sampler: Sampler) -> dict:
    from studio.app import create_window

    t0 = time.perf_counter()
    app, window = create_window()
    width, height = (int(v) for v in args.size_px.split("x"))
    window.resize(width, height)
    window.confirm_close = lambda: True
    drive = AppDriver(app, window)
    seconds: dict[str, float] = {"start": time.perf_counter() - t0}
    facts: dict = {}
    notes: dict[str, dict] = {}
    try:
        if {"model", "inspect", "original"} & set(args.groups):
            sampler.enter("open")
            _open(drive, folder, seconds, "open")
            info = window.session.info
            facts.update(parameters=info.parameters, blocks=info.blocks, matrices=len(info.layers),
                         stored_bytes=info.memory_bytes, file_bytes=info.file_bytes,
                         memory_plan_line=window.pages["model"].facts["plan"].text())
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                drive.grab("model", args.screenshots / "model-8b.png")
        if "inspect" in args.groups:
            inspect_phases(drive, folder, args, sampler, seconds, facts, notes)
        if "original" in args.groups:
            for phase, run in (("evaluate the original", evaluate), ("chat with the original", chat)):
                sampler.enter(phase)
                seconds[phase], notes[phase] = run(drive, "original", args)
        if "quantized" in args.groups:
            sampler.enter("open the quantized")
            _open(drive, quantized, seconds, "open the quantized")
            facts["quantized"] = quantized_facts(quantized)
            for phase, run in (("evaluate the quantized", evaluate), ("chat with the quantized", chat)):
                sampler.enter(phase)
                seconds[phase], notes[phase] = run(drive, "quantized", args)
    finally:
        sampler.enter("end")
        window.close()
        app.processEvents()
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": current_commit()}
    phases = {}
    for phase, peaks in sampler.peaks.items():
        if phase == "end":
            continue
        phases[phase] = {**peaks, "seconds": seconds.get(phase), **notes.get(phase, {}), **stamp,
                         "load": os.getloadavg()[0]}
    return {**facts, "hwm_per_phase": sampler.hwm_reset, "windows": args.windows, "seqlen": args.seqlen,
            "tokens": args.tokens, "phases": phases}


def _open(drive: AppDriver, folder: Path, seconds: dict, phase: str) -> None:
    model_page = drive.window.pages["model"]
    drive.window.show_page("model")
    model_page.spec_edit.setText(str(folder))
    outcome, seconds[phase] = drive.job(model_page.open_button.click, f"opening {folder.name}")
    if outcome != "done":
        raise SystemExit(f"opening {folder}: {outcome}")


def inspect_phases(drive: AppDriver, folder: Path, args: argparse.Namespace, sampler: Sampler,
                   seconds: dict, facts: dict, notes: dict) -> None:
    """Histogram of the largest matrix, the outlier statistics computed, then again from the cache."""
    window = drive.window
    info = window.session.info
    sampler.enter("histogram")
    inspect = window.pages["inspect"]
    window.show_page("inspect")
    largest = max(reversed(info.layers), key=lambda row: row["parameters"])["name"]  # the last block's
    expected = next(row["parameters"] for row in info.layers if row["name"] == largest)
    facts.update(largest_matrix=largest, largest_parameters=expected)
    t1 = time.perf_counter()
    inspect.select_matrix(largest)
    drive.wait(lambda: inspect.weight_hist.counts.sum() == expected, 600, "drawing a histogram")
    seconds["histogram"] = time.perf_counter() - t1

    sampler.enter("statistics")
    blocks_done: list[str] = []

    def on_progress(progress) -> None:
        if progress.event.stage == "stats" and progress.event.item:
            blocks_done.append(progress.event.item)
            print(f"  {progress.event.item}: {time.perf_counter() - t2:.1f} s", flush=True)
            if args.blocks is not None and len(blocks_done) >= args.blocks:
                window.runner.cancel()

    t2 = time.perf_counter()
    outcome, seconds["statistics"] = drive.job(inspect.analyse, "outlier statistics", on_progress=on_progress)
    notes["statistics"] = {"outcome": outcome, "blocks_computed": len(blocks_done)}

    sampler.enter("statistics from the cache")  # open the model again, the same blocks come from the cache
    drive.job(window.pages["model"].open_button.click, "opening the model again")
    window.show_page("inspect")
    blocks_done.clear()
    t2 = time.perf_counter()
    outcome, seconds["statistics from the cache"] = drive.job(
        inspect.analyse, "outlier statistics from the cache", on_progress=on_progress)
    if window.session.stats is not None:
        drive.wait(lambda: inspect.previewer.latest is not None and not inspect.previewer.computing, 300,
                   "previewing the setting")
    notes["statistics from the cache"] = {"outcome": outcome}
    sampler.enter("screenshots")
    if args.screenshots:
        inspect.select_matrix(largest)
        drive.wait(lambda: inspect.weight_hist.counts.sum() == expected, 600, "drawing a histogram")
        drive.grab("inspect", args.screenshots / "inspect-8b.png")


def evaluate(drive: AppDriver, which: str, args: argparse.Namespace) -> tuple[float, dict]:
    """Evaluate ``which`` ("original" or "quantized": the latest result) alone, with the page's controls."""
    from PySide6.QtCore import Qt

    from studio.pages.evaluate import ORIGINAL_KEY

    window = drive.window
    page = window.pages["evaluate"]
    window.show_page("evaluate")
    page.eval_form.editors["windows"].setValue(args.windows)
    page.eval_form.editors["seqlen"].setValue(args.seqlen)
    wanted = ORIGINAL_KEY if which == "original" else str(window.session.latest_result.path)
    for i in range(page.models_list.count()):
        item = page.models_list.item(i)
        ticked = item.data(Qt.ItemDataRole.UserRole) == wanted
        item.setCheckState(Qt.CheckState.Checked if ticked else Qt.CheckState.Unchecked)
    loaded_at: list[float] = []

    def on_progress(progress) -> None:
        if progress.event.stage == "eval" and not loaded_at:
            loaded_at.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    outcome, seconds = drive.job(page.start, f"evaluating the {which}", on_progress=on_progress)
    if outcome != "done":
        raise SystemExit(f"evaluating the {which}: {outcome}")
    row = page.runs[-1]
    dtype = _dtype_of(window, which)
    print(f"  perplexity {row['perplexity']:.1f}, {row['tokens_per_second']:.1f} tokens/s, {dtype}", flush=True)
    return seconds, {"load_seconds": loaded_at[0] if loaded_at else None, "perplexity": row["perplexity"],
                     "tokens_per_second": row["tokens_per_second"], "dtype": dtype}


def chat(drive: AppDriver, which: str, args: argparse.Namespace) -> tuple[float, dict]:
    """One greedy exchange with ``which`` on the Chat page."""
    from studio.pages.chat import MODE_ORIGINAL, MODE_QUANTIZED

    window = drive.window
    page = window.pages["chat"]
    window.show_page("chat")
    page.select_mode(MODE_ORIGINAL if which == "original" else MODE_QUANTIZED)
    if which == "quantized":
        page.result_combo.setCurrentIndex(page.result_combo.findData(str(window.session.latest_result.path)))
    page.settings_form.editors["temperature"].setValue(0.0)
    page.settings_form.editors["max_new_tokens"].setValue(args.tokens)
    page.input_edit.setPlainText(CHAT_PROMPT)
    outcome, seconds = drive.job(page.send, f"chatting with the {which}")
    if outcome != "done":
        raise SystemExit(f"chatting with the {which}: {outcome}")
    stats = page.stats_labels["left"].text().replace("<b>", "").replace("</b>", "")
    print(f"  {stats}", flush=True)
    return seconds, {"reply_stats": stats}


def _dtype_of(window, which: str) -> str:
    """The dtype the evaluated model's weights are stored in memory (the quantized: its non-packed tensors)."""
    session = window.session
    model = session.model.dense.model if which == "original" else session.latest_result.loaded.model
    return ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))


def quantized_facts(folder: Path) -> dict:
    from core.checkpoint import read_quantization_config

    config = read_quantization_config(folder).get("config") or {}
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"folder": str(folder), "bytes": size, "bits": config.get("bits"), "method": config.get("method"),
            "command": " ".join(quantize_command(Path(str(folder).removesuffix(QUANTIZED_SUFFIX))))}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


PHASE_LABELS = {
    "start": "start the app (imports, window)", "open": "open the model (Model page)",
    "histogram": "Inspect: histogram of the largest matrix",
    "statistics": "Inspect: outlier statistics, {blocks_computed} blocks computed ({outcome})",
    "statistics from the cache": "Inspect: outlier statistics from the cache ({outcome}), previews",
    "screenshots": "screenshots (the histogram drawn again)",
    "evaluate the original": "Evaluate the original (loaded whole, {dtype}; load {load_seconds:.1f} s)",
    "chat with the original": "Chat with the original: {reply_stats}",
    "open the quantized": "open the quantized folder (Model page)",
    "evaluate the quantized": "Evaluate the quantized ({dtype} besides the packed codes; load {load_seconds:.1f} s)",
    "chat with the quantized": "Chat with the quantized: {reply_stats}",
}


def markdown(r: dict) -> str:
    from bench.report import machine_line

    phases = r["phases"]
    peak_anon = max(p["rss_anon"] for p in phases.values())
    peak_rss = max(p["vm_rss"] for p in phases.values())
    peak_hwm = max(p["vm_hwm"] for p in phases.values())
    peak = max(peak_hwm, peak_anon, peak_rss)
    worst = max(phases, key=lambda name: max(phases[name]["vm_hwm"], phases[name]["vm_rss"]))
    verdict = "met" if peak < TARGET_BYTES else "**not met**"
    if any(name not in phases for name in PHASE_LABELS):
        verdict += " for the phases measured so far (the rest: below)"
    lines = [
        f"## The studio on a big model ({r['model']}): memory and time of its pages",
        "",
        machine_line(),
        "",
        f"`python -m bench.studio_memory` drives the real studio offscreen (studio.app.create_window, the pages' own "
        f"buttons and fields) on the {r['model']} folder of bench.big_models ({r['parameters'] / 1e9:.2f} B "
        f"parameters, {r['blocks']} blocks, {r['matrices']} quantizable matrices, random bf16 weights, "
        f"{_gb(r['file_bytes'] or 0)} of safetensors shards on disk): opens it on the Model page; on the Inspect "
        "page draws the histogram of its largest matrix, computes the outlier statistics block by block (into an "
        "empty cache), then runs them again from the on-disk cache; Evaluates the original on "
        f"{r['windows']} windows of {r['seqlen']} tokens of the built-in text (the page loads it whole in its "
        f"stored dtype) and has one Chat exchange with it (greedy, {r['tokens']} new tokens, the prompt "
        f"\"{CHAT_PROMPT}\"); then opens the quantized folder on the Model page and does the same Evaluate and "
        "Chat with it. RssAnon and VmRSS: this process sampled every 0.1 s; VmHWM: the kernel's peak resident "
        "set (mapped weight pages included), "
        + ("reset when each phase starts, so each phase shows its own peak. " if r.get("hwm_per_phase") else
           "from the process start. ")
        + "GB = 10^9 bytes, MiB = 2^20 bytes. The machine is shared: seconds vary with the load average "
        "(last column), memory does not.",
    ]
    if "quantized" in r:
        q = r["quantized"]
        lines += ["", f"The quantized folder ({_gb(q['bytes'])} on disk, {q['bits']}-bit {q['method']}) was made "
                      f"once with `{q['command']}` (random weights: perplexities are meaningless, memory and "
                      "seconds are the point)."]
    lines += [
        "",
        "Target (issue 15), judged from the numbers below:",
        "",
        f"- the studio's peak memory stays under 16 GB throughout: {verdict} (the largest of all phases: VmHWM "
        f"{_gb(peak_hwm)}, peak VmRSS {_gb(peak_rss)}, peak RssAnon {_gb(peak_anon)}; the highest phase: {worst})",
    ]
    if "open" in phases and phases["open"]["seconds"] is not None:
        open_verdict = "met" if phases["open"]["seconds"] < OPEN_TARGET_SECONDS else "**not met**"
        lines.append(f"- the Model page opens the folder in under {OPEN_TARGET_SECONDS} s: {open_verdict} "
                     f"({phases['open']['seconds']:.1f} s)")
    lines += [
        "",
        "| phase | seconds | peak RssAnon | peak VmRSS | VmHWM | load | run |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for phase, label in PHASE_LABELS.items():
        if phase not in phases:
            continue
        p = phases[phase]
        try:
            label = label.format(**p)
        except (KeyError, TypeError, ValueError):
            label = phase
        seconds = f"{p['seconds']:.1f}" if p.get("seconds") is not None else "–"
        mark = " ¹" if p.get("hwm_since_start") else ""
        lines.append(f"| {label} | {seconds} | {p['rss_anon'] / 2**20:,.0f} MiB | {p['vm_rss'] / 2**20:,.0f} MiB | "
                     f"{p['vm_hwm'] / 2**20:,.0f} MiB{mark} | {p.get('load', 0):.1f} | {p['date']} ({p['commit']}) |")
    missing = [PHASE_LABELS[name].split(" (")[0].split(":")[0] for name in PHASE_LABELS if name not in phases]
    if any(p.get("hwm_since_start") for p in phases.values()):
        lines += ["", "¹ measured before VmHWM was reset per phase: the process's peak since it started."]
    if missing:
        lines += ["", f"Not measured yet: {'; '.join(missing)}."]
    stats = phases.get("statistics", {})
    if stats.get("blocks_computed"):
        cached = phases.get("statistics from the cache", {}).get("seconds")
        lines += ["", f"Outlier statistics: {stats['seconds'] / stats['blocks_computed']:.1f} s per block computed "
                      "(each matrix read from its shard, 16-bit patterns counted)"
                      + (f", {cached:.1f} s for the cached pass." if cached is not None else ".")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
