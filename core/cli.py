"""The ``squeeze`` command line: the same engine calls as the studio.

Bad input prints one line on stderr and exits with code 2; Ctrl-C cancels cleanly
(exit 130) and leaves no half-written output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import TypeVar

from core.config import BIT_CHOICES
from core.progress import ProgressEvent

T = TypeVar("T")
EXIT_USAGE = 2
EXIT_CANCELLED = 130
NOTICE_STAGES = ("plan", "resume", "ranks")  # events printed as one full line even with --quiet


def drive(gen: Generator[ProgressEvent, None, T], quiet: bool = False) -> T:
    """Run a progress generator with one tqdm bar per stage; Ctrl-C closes it (its cleanup runs)."""
    from tqdm import tqdm

    bar, stage = None, None
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if event.stage in NOTICE_STAGES:  # a line to read in full (the memory plan), not a bar
                tqdm.write(f"squeeze: {event.message}", file=sys.stderr)
                continue
            if quiet:
                continue
            if event.stage != stage or bar is None:
                if bar is not None:
                    bar.close()
                stage = event.stage
                bar = tqdm(total=event.total or None, desc=event.stage, unit="step", dynamic_ncols=True,
                           file=sys.stderr, leave=True)
            if event.total and bar.total != event.total:
                bar.total = event.total
            bar.n = event.done
            bar.set_postfix_str(event.message[-60:], refresh=True)
    except KeyboardInterrupt:
        gen.close()
        if bar is not None:
            bar.leave = False  # an interrupted or failed stage's bar is wiped, so the last line says why
        raise
    except Exception:
        if bar is not None:
            bar.leave = False
        raise
    finally:
        if bar is not None:
            bar.close()


def _add_quant_settings(p: argparse.ArgumentParser) -> None:
    width = p.add_mutually_exclusive_group()
    width.add_argument("--bits", type=int, choices=BIT_CHOICES, help="bits per dense weight (default 4)")
    width.add_argument("--target-bits", type=float, metavar="B",
                       help="mixed precision: average bits per dense weight between 3 and 6 (e.g. 3.5); each "
                            "matrix gets one of the two whole widths around it (3.5: 3 or 4), the wider where it "
                            "lowers the sensitivity-weighted error most")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--outlier-range", type=float, metavar="R",
                   help="outliers beyond Q1-R*IQR / Q3+R*IQR of each matrix (the original's --range)")
    g.add_argument("--outlier-percent", type=float, metavar="P",
                   help="percent of all weights kept as outliers (default 0.45; 0 for dense-only)")
    p.add_argument("--sensitivity", type=float, default=0.05, metavar="S",
                   help="percent of each matrix's most sensitive weights kept exactly (default 0.05)")
    p.add_argument("--method", default="squeezellm", choices=("squeezellm", "rtn", "rtn-g128"),
                   help="squeezellm, or a round-to-nearest baseline")
    p.add_argument("--embed-bits", type=int, default=None, metavar="B",
                   help="token embedding: 4, 5, 6 or 8 bits of lookup-table codes, or 16 for float16 (default "
                        f"{_default_width('embed_bits')}); a tied embedding and head are stored once, at the larger width")
    p.add_argument("--head-bits", type=int, default=None, metavar="B",
                   help=f"output head (lm_head): 4, 5, 6, 8 or 16 (default {_default_width('head_bits')})")
    p.add_argument("--refine", choices=("none", "lnq"), default=None,
                   help="lnq: after k-means, refit each row's lookup table and codes against the layer's output "
                        "error weighted by the loss gradients (same format; slower). Default: "
                        + ("lnq" if _default_refine() else "none"))
    p.add_argument("--refine-groups", type=int, default=None, metavar="G",
                   help="with --refine lnq: weigh each of G contiguous groups of a matrix's output rows by their own "
                        "loss gradients (G must divide every matrix's rows; each group adds one in x in Hessian per "
                        "matrix). Default 1")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default="builtin", metavar="SOURCE",
                   help="builtin, a UTF-8 text file, or a datasets name (wikitext2, c4, hf:NAME)")
    p.add_argument("--samples", type=int, default=100, help="calibration windows (default 100)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")


def quant_config_from(args: argparse.Namespace):
    from core.config import EMBED_WIDTHS, EMBED_WIDTHS_TEXT, MAX_REFINE_GROUPS, OutlierConfig, QuantConfig

    if args.outlier_range is not None:
        outliers = OutlierConfig(range_multiplier=args.outlier_range, percent=None)
    else:
        percent = 0.45 if args.outlier_percent is None else args.outlier_percent
        outliers = OutlierConfig(percent=percent or None)
    refine = _default_refine() if getattr(args, "refine", None) is None else args.refine == "lnq"
    if getattr(args, "refine", None) == "lnq" and args.method != "squeezellm":
        raise ValueError(f"--refine lnq refines SqueezeLLM's tables: use --method squeezellm, not {args.method}")
    groups = getattr(args, "refine_groups", None)
    if groups is not None:
        if not (refine and args.method == "squeezellm"):
            raise ValueError("--refine-groups sets refinement's channel groups: add --refine lnq, or drop it")
        if not 1 <= groups <= MAX_REFINE_GROUPS:
            raise ValueError(f"--refine-groups {groups} is not supported: use a whole number from 1 to "
                             f"{MAX_REFINE_GROUPS} that divides every matrix's rows (1: one Hessian per matrix)")
    widths = {field: getattr(args, field) for field in ("embed_bits", "head_bits")
              if getattr(args, field, None) is not None}
    for field, value in widths.items():
        if value not in EMBED_WIDTHS:
            option = "--" + field.replace("_", "-")
            raise ValueError(f"{option} {value} is not supported: {EMBED_WIDTHS_TEXT}")
    return QuantConfig(bits=4 if args.bits is None else args.bits, method=args.method, outliers=outliers,
                       sensitivity_percent=args.sensitivity, target_bits=args.target_bits,
                       refine=refine and args.method == "squeezellm", refine_groups=groups or 1, **widths)


def _default_width(field: str) -> int:
    from core.config import QuantConfig

    return getattr(QuantConfig(), field)


def _default_refine() -> bool:
    from core.config import QuantConfig

    return QuantConfig().refine


def calibration_from(args: argparse.Namespace):
    from core.config import CalibrationConfig

    return CalibrationConfig(source=args.calibration, samples=args.samples, seqlen=args.seqlen)


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes print one line (the problem and where to look), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from core.cli_commands import COMMANDS

    parser = _OneLineParser(prog="squeeze", description="SqueezeLLM dense-and-sparse quantization.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_OneLineParser)
    for name, (help_text, configure, _run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
    return parser




def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``squeeze`` console script. Returns the exit code."""
    from core.cli_commands import COMMANDS
    from core.errors import UserError, describe_memory_error

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; theirs would interleave
    hf_logging.set_verbosity_error()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except KeyboardInterrupt:
        resume = " (run the same command again to continue from the last finished block)" \
            if args.command == "quantize" else ""
        print(f"squeeze: cancelled; nothing was written{resume}", file=sys.stderr)
        return EXIT_CANCELLED
    except (UserError, ValueError) as exc:
        print(f"squeeze: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        message = describe_memory_error(exc)
        if message is None:
            raise  # a bug: the traceback is what helps
        print(f"squeeze: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    sys.exit(main())
