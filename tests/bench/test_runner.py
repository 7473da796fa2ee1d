"""The single benchmark entry point: lists every benchmark and rewrites only the head of BENCHMARKS.md."""

import subprocess
import sys
from pathlib import Path

from bench.__main__ import BENCHMARKS_TO_RUN, write_head

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_module_exists_and_is_listed():
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for name, (module, *_) in BENCHMARKS_TO_RUN.items():
        assert name in out
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def test_head_is_rewritten_and_sections_are_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Old head\n\nstale text\n\n<!-- cpu:start -->\n## CPU\n| a |\n<!-- cpu:end -->\n")
    write_head({"cpu": ("ok", 90.0), "cuda-kernels": ("skipped (no NVIDIA GPU)", 1.0)}, quick=False, path=path)
    text = path.read_text()
    assert "stale text" not in text and "Old head" not in text
    assert "| cpu | decode/prefill" in text and "| ok | 1.5 |" in text
    assert "skipped (no NVIDIA GPU)" in text
    assert text.endswith("<!-- cpu:start -->\n## CPU\n| a |\n<!-- cpu:end -->\n")
    assert "torch" in text  # the machine line names the versions


def test_unknown_benchmark_is_refused():
    result = subprocess.run([sys.executable, "-m", "bench", "--only", "nonsense"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_head_keeps_the_rows_of_benchmarks_left_out(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Old head\n")
    write_head({"cpu": ("ok", 60.0), "kmeans": ("ok", 120.0)}, quick=False, path=path)
    write_head({"kmeans": ("FAILED (exit 1; previous section kept)", 30.0)}, quick=False, path=path)
    write_head({"kmeans": ("ok", 180.0)}, quick=False, path=path)
    rows = [line for line in path.read_text().splitlines() if line.startswith(("| cpu ", "| kmeans "))]
    assert rows[0].startswith("| kmeans ") and rows[0].endswith("| ok | 3.0 |")  # listed in the runner's order
    assert rows[1].endswith("| ok (an earlier run) | 1.0 |")  # marked once, however many runs passed
    assert len(rows) == 2
