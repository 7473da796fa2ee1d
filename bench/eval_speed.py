"""Perplexity evaluation throughput on the CPU, and the kernel's perplexity against the torch path.

python -m bench.eval_speed [--windows 40] [--batch-size 4]

The demo model in fp32 and the four quantized folders of bench.cpu_inference (3/4-bit,
dense-only and dense-and-sparse), each evaluated with core.evaluate.perplexity on the same
windows of the built-in corpus (the ASSETS.md protocol), once through the compiled CPU kernel
and once through the torch reference (``SQUEEZE_KERNELS=torch``). Writes the "eval" section of
BENCHMARKS.md: tokens/s of each and the perplexities of both paths side by side.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

from bench.report import machine_line, update_section
from core.progress import run_to_end


@contextmanager
def kernels(choice: str):
    """Run the block with ``SQUEEZE_KERNELS=choice`` (read by core.kernels on every call)."""
    old = os.environ.get("SQUEEZE_KERNELS")
    os.environ["SQUEEZE_KERNELS"] = choice
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SQUEEZE_KERNELS")
        else:
            os.environ["SQUEEZE_KERNELS"] = old


def measure(model, windows, batch_size: int) -> tuple[float, float]:
    """(perplexity, tokens per second) of one evaluation pass."""
    from core.evaluate import perplexity

    t0 = time.perf_counter()
    result = run_to_end(perplexity(model, windows, batch_size=batch_size))
    return result.perplexity, windows.numel() / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where bench.cpu_inference caches its quantized folders")
    args = parser.parse_args()
    from pathlib import Path

    import cuda_ext
    from bench.cpu_inference import quantized_folders
    from core.checkpoint import load_quantized
    from core.data import corpus_tokens, evaluation_windows
    from core.models import load_model
    from core.paths import cache_dir

    loaded = load_model("demo")
    windows = evaluation_windows(corpus_tokens(loaded.tokenizer, "builtin"), args.windows, 512)
    folders = quantized_folders(Path(args.workdir) if args.workdir else cache_dir() / "bench")
    load_before = os.getloadavg()[0]
    rows = [("fp32 original", *measure(loaded.model, windows, args.batch_size), None, None)]
    print(rows[-1], flush=True)
    del loaded
    for label, folder in folders.items():
        model = load_quantized(folder).model
        with kernels("cpu"):
            kernel = measure(model, windows, args.batch_size)
        with kernels("torch"):
            reference = measure(model, windows, args.batch_size)
        rows.append((label, *kernel, *reference))
        print(rows[-1], flush=True)
    base_speed = rows[0][2]
    lines = [
        "## Perplexity evaluation on the CPU: throughput, and the kernel against the torch path", "",
        machine_line(), "",
        f"core.evaluate.perplexity on the first {args.windows} x 512 evaluation tokens of the built-in corpus, batch "
        f"{args.batch_size}, one process (load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after). "
        "Quantized folders from bench.cpu_inference (random positive Fisher: the perplexities show that both paths "
        "agree, not the method's accuracy, see the accuracy section). "
        f"CPU kernel {'built' if cuda_ext.is_available('cpu') else 'NOT available: ' + str(cuda_ext.unavailable_reason('cpu'))}.",
        "",
        "| model | tokens/s (kernel) | x fp32 | tokens/s (torch path) | perplexity (kernel) | perplexity (torch path) "
        "| difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, ppl, speed, ref_ppl, ref_speed in rows:
        if ref_ppl is None:
            lines.append(f"| {label} | {speed:.0f} | 1.00 | - | {ppl:.4f} | - | - |")
        else:
            lines.append(f"| {label} | {speed:.0f} | {speed / base_speed:.2f} | {ref_speed:.0f} | {ppl:.4f} | "
                         f"{ref_ppl:.4f} | {abs(ppl - ref_ppl) / ref_ppl:.1e} |")
    text = "\n".join(lines)
    update_section("eval", text)
    print(text)


if __name__ == "__main__":
    main()
