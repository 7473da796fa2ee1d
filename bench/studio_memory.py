"""The studio's memory on a model bigger than half the machine: the real app, offscreen, on the 8 B folder.

python -m bench.studio_memory [--size 8b] [--blocks N] [--screenshots DIR] [--no-report]

Drives the studio as a person would (studio.app.create_window, the pages' own buttons): opens the
random-weight Llama-3.1-8B-shaped bf16 folder of bench.big_models on the Model page, draws the
histogram of one of its largest matrices on the Inspect page, computes the whole-model outlier
statistics block by block (``--blocks N`` stops after N blocks with Cancel, as a person would; the
default is all of them), then runs the statistics again from their on-disk cache. A thread samples
this process's RssAnon and VmRSS every 0.1 s; VmHWM (the kernel's peak resident set, mapped file pages
included) is read per phase. The outlier-statistics cache is a fresh temporary folder, so the pass is
computed, not read. ``--screenshots DIR`` saves the Model and Inspect pages there (QWidget.grab()).
Writes bench/results/studio_memory.json and the "studio-memory" section of BENCHMARKS.md.
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


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Peak RssAnon and VmRSS of this process, overall and per named phase."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            time.sleep(SAMPLE_SECONDS)

    def sample(self) -> None:
        peaks = self.peaks.setdefault(self.phase, {"rss_anon": 0, "vm_rss": 0})
        peaks["rss_anon"] = max(peaks["rss_anon"], status_bytes("RssAnon"))
        peaks["vm_rss"] = max(peaks["vm_rss"], status_bytes("VmRSS"))

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()


class Driver(AppDriver):
    """AppDriver that also records VmHWM at the end of each phase."""

    def __init__(self, app, window, sampler: Sampler) -> None:
        super().__init__(app, window)
        self.sampler = sampler
        self.hwm: dict[str, int] = {}

    def end_phase(self, phase: str) -> None:
        self.hwm[phase] = status_bytes("VmHWM")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8b", help="a shape of bench.big_models: tiny, 1.1b, 3b, 8b")
    parser.add_argument("--workdir", type=Path, default=None, help="where bench.big_models wrote the folders")
    parser.add_argument("--blocks", type=int, default=None,
                        help="cancel the outlier statistics after this many blocks (default: all)")
    parser.add_argument("--screenshots", type=Path, default=None, help="save model and inspect PNGs here")
    parser.add_argument("--size-px", default="1400x900", help="window size WxH for the screenshots")
    parser.add_argument("--no-report", action="store_true", help="print the results, leave BENCHMARKS.md alone")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from bench.big_models import LABELS, SHAPES, default_workdir

    folder = (args.workdir or default_workdir()) / SHAPES[args.size][0]
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} does not exist: build it first with python -m bench.big_models {args.size}")
    scratch = Path(tempfile.mkdtemp(prefix="studio-memory-"))
    os.environ["SQUEEZE_STUDIO_HOME"] = str(scratch / "home")
    os.environ["SQUEEZE_CACHE_DIR"] = str(scratch / "cache")  # the statistics are computed, not read
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sampler = Sampler()
    sampler.start()
    try:
        result = measure(folder, args, sampler)
    finally:
        sampler.stopped.set()
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(model=LABELS[args.size], folder=str(folder), load=os.getloadavg()[0])
    print(json.dumps(result, indent=1))
    if not args.no_report:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        from bench.report import update_section

        update_section("studio-memory", markdown(result))
    return 0


def measure(folder: Path, args: argparse.Namespace, sampler: Sampler) -> dict:
    from studio.app import create_window

    t0 = time.perf_counter()
    app, window = create_window()
    width, height = (int(v) for v in args.size_px.split("x"))
    window.resize(width, height)
    window.confirm_close = lambda: True
    drive = Driver(app, window, sampler)
    seconds: dict[str, float] = {"start": time.perf_counter() - t0}
    drive.end_phase("start")
    try:
        sampler.enter("open")
        model_page = window.pages["model"]
        model_page.spec_edit.setText(str(folder))
        _outcome, seconds["open"] = drive.job(model_page.open_button.click, "opening the model")
        drive.end_phase("open")
        info = window.session.info
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            drive.grab("model", args.screenshots / "model-8b.png")

        sampler.enter("histogram")
        inspect = window.pages["inspect"]
        window.show_page("inspect")
        largest = max(reversed(info.layers), key=lambda row: row["parameters"])["name"]  # the last block's
        t1 = time.perf_counter()
        inspect.select_matrix(largest)
        expected = next(row["parameters"] for row in info.layers if row["name"] == largest)
        drive.wait(lambda: inspect.weight_hist.counts.sum() == expected, 600, "drawing a histogram")
        seconds["histogram"] = time.perf_counter() - t1
        drive.end_phase("histogram")

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
        drive.end_phase("statistics")
        computed = len(blocks_done)

        sampler.enter("statistics from the cache")  # open the model again, the same blocks come from the cache
        drive.job(model_page.open_button.click, "opening the model again")
        window.show_page("inspect")
        blocks_done.clear()
        t2 = time.perf_counter()
        cache_outcome, seconds["statistics from the cache"] = drive.job(
            inspect.analyse, "outlier statistics from the cache", on_progress=on_progress)
        if window.session.stats is not None:
            drive.wait(lambda: inspect.previewer.latest is not None and not inspect.previewer.computing, 300,
                       "previewing the setting")
        drive.end_phase("statistics from the cache")
        sampler.enter("screenshots")
        if args.screenshots:
            inspect.select_matrix(largest)
            drive.wait(lambda: inspect.weight_hist.counts.sum() == expected, 600, "drawing a histogram")
            drive.grab("inspect", args.screenshots / "inspect-8b.png")
    finally:
        sampler.enter("end")
        window.close()
        app.processEvents()
    return {
        "parameters": info.parameters, "blocks": info.blocks, "matrices": len(info.layers),
        "stored_bytes": info.memory_bytes, "file_bytes": info.file_bytes, "largest_matrix": largest,
        "largest_parameters": expected, "seconds": seconds, "blocks_computed": computed,
        "statistics_outcome": outcome, "cache_outcome": cache_outcome,
        "peaks": sampler.peaks, "vm_hwm": status_bytes("VmHWM"), "vm_hwm_by_phase": drive.hwm,
        "memory_plan_line": window.pages["model"].facts["plan"].text(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "commit": current_commit(),
    }




def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(r: dict) -> str:
    from bench.report import machine_line

    peak_anon = max(p["rss_anon"] for p in r["peaks"].values())
    peak_rss = max(p["vm_rss"] for p in r["peaks"].values())
    peak = max(r["vm_hwm"], peak_anon)
    verdict = "met" if peak < TARGET_BYTES else "**not met**"
    open_verdict = "met" if r["seconds"]["open"] < OPEN_TARGET_SECONDS else "**not met**"
    all_blocks = r["blocks_computed"] == r["blocks"]
    scope = "all" if all_blocks else f"{r['blocks_computed']} of the"
    lines = [
        f"## The studio on a big model ({r['model']}): memory and time of the Model and Inspect pages",
        "",
        machine_line(),
        "",
        f"`python -m bench.studio_memory` drives the real studio offscreen (studio.app.create_window, the pages' own "
        f"buttons) on the {r['model']} folder of bench.big_models ({r['parameters'] / 1e9:.2f} B parameters, "
        f"{r['blocks']} blocks, {r['matrices']} quantizable matrices, random bf16 weights, "
        f"{_gb(r['file_bytes'] or 0)} of safetensors shards on disk): opens it on the Model page, draws the "
        f"histogram of its largest matrix ({r['largest_parameters'] / 1e6:.1f} M weights) on the Inspect page, "
        f"computes the outlier statistics of {scope} {r['blocks']} blocks (into an empty cache), then runs them "
        "again from the on-disk cache. RssAnon and VmRSS: this process sampled every 0.1 s; VmHWM: the kernel's "
        f"peak resident set (mapped weight pages included). Load average at the end: {r['load']:.1f} (the machine "
        f"is shared). Run {r['date']} ({r['commit']}).",
        "",
        "Targets (issue 15), judged from the numbers below:",
        "",
        f"- the studio's peak memory stays under 16 GB throughout: {verdict} (VmHWM {_gb(r['vm_hwm'])}, peak "
        f"RssAnon {_gb(peak_anon)}, peak VmRSS {_gb(peak_rss)})",
        f"- the Model page opens the folder in under {OPEN_TARGET_SECONDS} s: {open_verdict} "
        f"({r['seconds']['open']:.1f} s)",
        "",
        "| phase | seconds | peak RssAnon | peak VmRSS | VmHWM at its end |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"start": "start the app (imports, window)", "open": "open the model (Model page)",
             "histogram": "histogram of the largest matrix",
             "statistics": f"outlier statistics, {r['blocks_computed']} blocks computed ({r['statistics_outcome']})",
             "statistics from the cache": f"outlier statistics from the cache ({r['cache_outcome']}), previews",
             "screenshots": "screenshots (the histogram drawn again)"}
    for phase, label in names.items():
        if phase not in r["peaks"]:
            continue
        peaks = r["peaks"].get(phase, {"rss_anon": 0, "vm_rss": 0})
        seconds = f"{r['seconds'][phase]:.1f}" if phase in r["seconds"] else "–"
        hwm = r["vm_hwm_by_phase"].get(phase, r["vm_hwm"])  # the last phase: the process's final VmHWM
        lines.append(f"| {label} | {seconds} | {peaks['rss_anon'] / 2**20:,.0f} MiB | "
                     f"{peaks['vm_rss'] / 2**20:,.0f} MiB | {hwm / 2**20:,.0f} MiB |")
    if r["blocks_computed"]:
        lines += ["", f"Outlier statistics: {r['seconds']['statistics'] / r['blocks_computed']:.1f} s per block "
                      f"computed (each matrix read from its shard, 16-bit patterns counted), "
                      f"{r['seconds']['statistics from the cache']:.1f} s for the cached pass."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
