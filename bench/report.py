"""Write one section of BENCHMARKS.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_line() -> str:
    """Machine, versions and date, for the head of a section (absolute times drift; ratios are the point)."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    return (f"_{datetime.date.today().isoformat()}, {os.cpu_count()} cores ({cpu}), Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}_")


def current_commit() -> str:
    """The short hash of the checkout the benchmark runs from: $SQUEEZE_BENCH_COMMIT when set (a copy of
    the tree without its .git, as on a lent GPU machine), else git's answer ("?" outside git or without git)."""
    import subprocess

    if os.environ.get("SQUEEZE_BENCH_COMMIT"):
        return os.environ["SQUEEZE_BENCH_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS.parent, capture_output=True,
                              text=True)
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``markdown``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery number here is written by a script in `bench/`.\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
