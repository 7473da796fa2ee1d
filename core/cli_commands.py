"""The subcommands of ``squeeze``: each is (help, configure(parser), run(args) -> exit code)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.cli import (_add_calibration, _add_quant_settings, calibration_from, drive, folder_bytes,
                      quant_config_from)
from core.units import format_bytes


# ---- quantize ---------------------------------------------------------------------------------------

def _configure_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="demo, an HF folder, a .gguf file or a hub name")
    _add_quant_settings(p)
    _add_calibration(p)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--output", "-o", required=True, type=Path, help="folder to write the quantized model to")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--cpu-memory", type=_gigabytes, metavar="GB",
                   help="memory the run may use (default: 85%% of what is free); calibration activations beyond "
                        "it go to disk")
    p.add_argument("--gpu-memory", type=_gigabytes, metavar="GB", help="GPU memory the run may use (default: all free)")
    p.add_argument("--offload-dir", type=Path, metavar="DIR",
                   help="folder for activations that do not fit in memory (default: beside the output)")
    p.add_argument("--restart", action="store_true",
                   help="start over instead of resuming an interrupted run into the same output")
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="calibrate with N local processes, each on its share of the windows, the cores shared "
                        "between them (default 1; on GPUs one per GPU). Several machines: run the command under "
                        "torchrun instead (README, 'Several processes and machines')")


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes: give 1 or more, e.g. 2")
    return int(text)


def _gigabytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of gigabytes (e.g. 12)") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text} GB is out of range: give a positive size such as 12")
    return int(value * 2**30)


def _run_quantize(args: argparse.Namespace) -> int:
    from core.distributed import env_rank
    from core.pipeline import QuantizeJob, run_quantize_job

    job = QuantizeJob(model=args.model, output=args.output, config=quant_config_from(args),
                      calibration=calibration_from(args), device=args.device, overwrite=args.overwrite,
                      cpu_memory=args.cpu_memory, gpu_memory=args.gpu_memory, offload_dir=args.offload_dir,
                      restart=args.restart, workers=args.workers)
    if env_rank() > 0:  # a rank of torchrun's other than 0: rank 0 shows the progress and writes the folder
        from core.progress import run_to_end

        run_to_end(run_quantize_job(job))
        return 0
    report = drive(run_quantize_job(job), args.quiet)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    if job.config.target_bits is not None:
        print(f"mixed precision: {_split_text(report.matrices_per_bits)}, {report.dense_bits:.3f} bits per dense "
              f"weight (target {job.config.target_bits})")
    print(f"wrote {args.output}: {report.bits_per_weight:.3f} bits per weight, "
          f"{report.sparse_percent:.3f}% sparse, quantized layers {format_bytes(report.quantized_bytes)}, "
          f"folder {format_bytes(folder_bytes(args.output))} ({steps})")
    return 0


def _split_text(matrices_per_bits: dict[int, int]) -> str:
    """bits -> count as '105 matrices at 3 bits, 105 at 4 bits'."""
    parts = [f"{n} at {bits} bits" for bits, n in sorted(matrices_per_bits.items())]
    if not parts:
        return "no matrices"
    parts[0] = parts[0].replace(" at ", " matrices at ", 1)
    return ", ".join(parts)


# ---- inspect ----------------------------------------------------------------------------------------

def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="demo, an HF folder, a .gguf file or a hub name")
    _add_quant_settings(p)
    _add_calibration(p)
    p.add_argument("--fisher", action="store_true",
                   help="compute the sensitivity if it is not cached (otherwise overlaps are not counted)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_inspect(args: argparse.Namespace) -> int:
    from core.memory_plan import available_memory, plan_for
    from core.models import load_model
    from core.preview import collect_stats, embed_head_sizes, model_bytes, preview
    from core.sensitivity import load_cached_fisher, load_or_compute_fisher

    config = quant_config_from(args)
    loaded = load_model(args.model)
    calibration = calibration_from(args)
    fisher = load_cached_fisher(loaded.model, calibration)
    if fisher is None and args.fisher:
        fisher = drive(load_or_compute_fisher(loaded.model, loaded.tokenizer, calibration), args.quiet)
    stats = drive(collect_stats(loaded.model, fisher), args.quiet)
    q_bytes, o_bytes = model_bytes(loaded.model)
    result = preview(stats, config, o_bytes, q_bytes + o_bytes, embed_head_sizes(loaded.model))
    plan = plan_for(loaded.model, calibration.samples, calibration.seqlen, fisher=config.method == "squeezellm",
                    refine=config.refine, refine_groups=config.refine_groups, embed_bits=config.embed_bits,
                    head_bits=config.head_bits)
    if args.json:
        print(json.dumps({"range_multiplier": result.range_multiplier, "sparse_percent": result.sparse_percent,
                          "quantize_memory_bytes": plan.cpu_peak, "available_memory_bytes": available_memory(),
                          "bits_per_weight": result.bits_per_weight, "total_bytes": result.total_bytes,
                          "layers": [dict(layer.__dict__, shape=list(layer.shape)) for layer in result.layers]}))
        return 0
    print(f"{'layer':<42} {'shape':>11} {'threshold':>10} {'outliers':>9} {'sens.':>6} {'sparse %':>9}")
    for layer in result.layers:
        t = f"{layer.threshold:.4f}" if layer.threshold is not None else "-"
        print(f"{layer.name:<42} {layer.shape[0]:>5}x{layer.shape[1]:<5} {t:>10} {layer.outliers:>9} "
              f"{layer.sensitive:>6} {100 * layer.sparse / layer.numel:>9.3f}")
    r = f"{result.range_multiplier:.3f}" if result.range_multiplier is not None else "none"
    note = "" if fisher is not None else " (sensitivity not computed: overlaps with outliers not counted; --fisher)"
    print(f"IQR multiplier {r}; outliers {result.outlier_percent:.3f}%, sparse {result.sparse_percent:.3f}%{note}")
    width = f"{config.bits}-bit" if config.target_bits is None else f"mixed {config.widths[0]}/{config.widths[1]}-bit (target {config.target_bits})"
    print(f"{width}: {result.bits_per_weight:.3f} bits per weight; model {format_bytes(result.total_bytes)} "
          f"(now {format_bytes(result.original_bytes)})")
    print(f"quantizing {plan.describe()}; {format_bytes(available_memory())} free now (block inputs beyond "
          "--cpu-memory go to disk)")
    return 0


# ---- info -------------------------------------------------------------------------------------------

def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by 'squeeze quantize'")


def _run_info(args: argparse.Namespace) -> int:
    from core.checkpoint import layer_bits
    from core.folder_check import check_quantized_folder

    block = check_quantized_folder(args.folder)  # a broken folder is reported as broken, not summarised
    config = block.get("config", {})
    modules = block.get("modules", {})
    nnz = sum(m.get("nnz", 0) for m in modules.values())
    per_bits: dict[int, int] = {}
    for bits in layer_bits(block).values():
        per_bits[bits] = per_bits.get(bits, 0) + 1
    if len(per_bits) > 1 or config.get("target_bits") is not None:
        target = f", target {config['target_bits']}" if config.get("target_bits") is not None else ""
        width = f"mixed: {_split_text(per_bits)}{target}"
    else:
        width = f"{next(iter(per_bits), config.get('bits', '?'))} bits"
    print(f"folder:          {args.folder.resolve()}")
    print(f"source model:    {block.get('source_model', '?')}")
    groups = config.get("refine_groups", 1)
    refined = (f", refined (lnq, {groups} channel groups)" if groups > 1 else ", refined (lnq)") \
        if config.get("refine") else ""
    print(f"method:          {config.get('method', '?')}, {width}{refined}")
    outliers = config.get("outliers") or {}
    print(f"outliers:        range x{outliers.get('range_multiplier')} / target {outliers.get('percent')}% "
          f"(multiplier used {block.get('range_multiplier')})")
    print(f"sensitivity:     {config.get('sensitivity_percent', 0)}%")
    print(f"layers:          {len(modules)} quantized, {nnz} sparse values ({block.get('sparse_percent', 0):.3f}%)")
    print(f"bits per weight: {block.get('bits_per_weight', 0):.3f} (the decoder's projections)")
    print(f"embedding, head: {_embed_head_text(block)}")
    print(f"size on disk:    {format_bytes(folder_bytes(args.folder))} (the whole folder)")
    return 0


def _embed_head_text(block: dict) -> str:
    """How a folder stores its token embedding and output head (core.embed_head)."""
    record = block.get("embed_head") or {}
    kept = "float16" if block.get("embeddings_dtype") == "float16" else "as in the original"

    def part(info: dict | None) -> str:
        if info is None:
            return kept
        nnz = info.get("nnz", 0)
        return f"{info['bits']}-bit LUT" + (f" + {nnz} sparse" if nnz else "")

    embedding, head = record.get("embedding"), record.get("head")
    if head is not None and head.get("tied"):
        return f"{part(embedding)}, tied (stored once)"
    return f"embedding {part(embedding)}; head {part(head)}"


def _configure_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("cpu", "cuda", "all"), default="all", help="which kernels to build")


def _run_build(args: argparse.Namespace) -> int:
    from cuda_ext.build import KINDS, build_kernels, describe_build

    kinds = KINDS if args.kind == "all" else (args.kind,)
    print(describe_build(build_kernels(kinds)))
    return 0  # a kernel that cannot be built here is not an error: the torch path serves


from core.cli_interop import configure_export, configure_import, run_export, run_import  # noqa: E402
from core.cli_use import configure_chat, configure_eval, run_chat, run_eval  # noqa: E402

COMMANDS = {
    "quantize": ("Quantize a model with SqueezeLLM (or a baseline) into a folder.", _configure_quantize,
                 _run_quantize),
    "inspect": ("Per-layer outliers and sensitive counts for a setting, without quantizing.", _configure_inspect,
                _run_inspect),
    "info": ("Settings, size and bits per weight of a quantized folder.", _configure_info, _run_info),
    "eval": ("Perplexity of models and quantized folders on identical windows.", configure_eval, run_eval),
    "import": ("Convert an original SqueezeLLM packed .pt checkpoint into a quantized folder.",
               configure_import, run_import),
    "export": ("Export a quantized folder as squeezellm-pt, hf-dense or gguf.", configure_export, run_export),
    "build-kernels": ("Compile the optional CPU/CUDA kernels now instead of on first use.", _configure_build,
                      _run_build),
    "chat": ("Talk to a model or a quantized folder in the terminal (reads stdin).", configure_chat, run_chat),
}
