"""``squeeze import`` and ``squeeze export``: the original's checkpoints in, other formats out."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import drive, folder_bytes
from core.units import format_bytes

_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32"}


def configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="the original SqueezeLLM packed .pt (e.g. sq-llama-7b-w3-s0.pt)")
    p.add_argument("--base", help="the dense model it was made from (folder, demo, hub name, .gguf): config, "
                                  "tokenizer and any weights the file lacks")
    p.add_argument("--bits", type=int, choices=(3, 4), help="expected bit width (inferred when left out)")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run_import(args: argparse.Namespace) -> int:
    from core.interop.original_pt import import_original_checkpoint

    out = drive(import_original_checkpoint(args.checkpoint, args.base, args.output, args.bits,
                                           overwrite=args.overwrite), args.quiet)
    print(f"imported {args.checkpoint} into {out} ({format_bytes(folder_bytes(out))})")
    return 0


def configure_export(p: argparse.ArgumentParser) -> None:
    from core.interop.export import EXPORT_FORMATS

    p.add_argument("folder", type=Path, help="a folder written by 'squeeze quantize' or 'squeeze import'")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="squeezellm-pt (vLLM <= 0.6, 4-bit dense-only), hf-dense (dequantized HF folder), "
                        "gguf (dequantized, for llama.cpp / Ollama / LM Studio)")
    p.add_argument("--dtype", default="float16", choices=sorted(_DTYPES), help="dtype of dense tensors")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder (or .gguf file) to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run_export(args: argparse.Namespace) -> int:
    import torch

    from core.interop.export import export_model

    dtype = getattr(torch, _DTYPES[args.dtype])
    out = drive(export_model(args.folder, args.format, args.output, dtype=dtype, overwrite=args.overwrite),
                args.quiet)
    print(f"wrote {out} ({format_bytes(folder_bytes(out))})")
    if args.format != "squeezellm-pt":
        print(f"dequantized weights: measure the cost with 'squeeze eval {args.folder} {out} --compare'")
    return 0
