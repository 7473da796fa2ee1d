"""The end-to-end quantization job shared by the command line and the studio.

open the model lazily -> memory plan -> block by block: sensitivity, split, k-means, pack, write
(core.stream_quantize) -> folder moved into place atomically. A killed run resumes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import CalibrationConfig, QuantConfig, to_dict
from core.checkpoint import _check_output
from core.errors import UserError
from core.progress import ProgressEvent
from core.quantize import QuantReport


@dataclass(frozen=True)
class QuantizeJob:
    """Everything one quantization run needs.

    cpu_memory: bytes the run may use (None: 85% of what is free when it starts); block inputs
    beyond it go to ``offload_dir`` (None: inside the output's staging folder). restart: ignore a
    killed run's progress for this output instead of resuming it. workers: start that many local
    processes, each calibrating on its share of the windows (``core.distributed``).
    """

    model: str
    output: Path
    config: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    device: str = "auto"
    overwrite: bool = False
    cpu_memory: int | None = None
    gpu_memory: int | None = None
    offload_dir: Path | None = None
    restart: bool = False
    workers: int = 1  # local processes sharing the calibration (core.rank_launcher); under torchrun leave 1


def resolve_device(device: str) -> torch.device:
    """'auto' -> the GPU when torch sees one, else the CPU; 'cuda' without a GPU is a UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def _check_text_source(source: str) -> None:
    """A missing calibration file is reported before the model is loaded, not minutes later."""
    from core.data import KEYWORDS, load_text

    if source not in KEYWORDS and not source.startswith("hf:") and not Path(source).expanduser().is_file():
        load_text(source)  # raises the UserError that names the problem


def compute_dtype_for(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """float32 on a CPU (no fast bf16/fp16 arithmetic there), the stored dtype on a GPU."""
    return torch.float32 if device.type == "cpu" else stored


def run_quantize_job(job: QuantizeJob) -> Generator[ProgressEvent, None, QuantReport]:
    """Quantize ``job.model`` into ``job.output`` block by block; returns the report with per-stage seconds.

    Stages: "load", "plan", "forward", "backward" (sensitivity), "quantize", "allocate" (mixed
    precision), "save"; with several processes "ranks" (who does what, then what they exchanged).
    A killed run continues from its last finished block when started again.

    In a process group (torchrun, or ``job.workers`` > 1, which starts one) every rank runs this; rank
    0 returns the report, the others None once their share is done (``core.distributed``).
    """
    from core.distributed import join_ranks

    device = resolve_device(job.device)
    ranks, device = join_ranks(device, job.workers)
    if job.workers > 1:
        from core.rank_launcher import launch_workers

        return (yield from launch_workers(job))
    try:
        return (yield from _run_job(job, device, ranks))
    finally:
        ranks.close()


def _run_job(job: QuantizeJob, device: torch.device, ranks) -> Generator[ProgressEvent, None, QuantReport | None]:
    from core.data import calibration_windows, check_window_fits, corpus_tokens
    from core.lazy_model import LazyModel
    from core.memory_plan import activation_budget, available_memory, plan_for
    from core.stream_quantize import StreamOptions, StreamQuantizer

    output = Path(job.output).expanduser().resolve()

    def check_inputs() -> None:  # fail before the long work, not after it
        _check_output(output, job.overwrite)
        _check_text_source(job.calibration.source)

    ranks.from_main(check_inputs)  # rank 0 writes the output and reads the text: its checks count
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    yield ProgressEvent("load", 0, 1, f"opening {job.model}")
    folder = yield from _resolve_in_turn(job.model, ranks)
    lazy = LazyModel.open(folder)
    if device.type != "cpu":
        lazy = LazyModel.open(folder, compute_dtype_for(device, lazy.stored_dtype))
    tokenizer = load_tokenizer(folder)
    squeezellm = job.config.method == "squeezellm"
    windows = None
    if squeezellm:
        check_window_fits(lazy.config, job.calibration.seqlen)
        yield ProgressEvent("load", 0, 1, "preparing calibration text")

        def make_windows() -> dict[str, torch.Tensor]:
            tokens = corpus_tokens(tokenizer, job.calibration.source)
            return {"windows": calibration_windows(tokens, job.calibration.samples, job.calibration.seqlen,
                                                   job.calibration.seed)}

        windows = ranks.tensors_from_main(make_windows, "calibration windows")["windows"]  # rank 0's, everywhere
    samples = ranks.my_windows(windows).shape[0] if squeezellm else job.calibration.samples
    refine = squeezellm and job.config.refine
    if refine:  # every matrix's rows split into the channel groups: refused now, not after the calibration pass
        from core.block_pass import block_linears
        from core.refine import check_groups

        check_groups({name: lin for i in range(len(lazy.blocks)) for name, lin in block_linears(lazy, i).items()},
                     job.config.refine_groups)
    plan = plan_for(lazy, samples, job.calibration.seqlen, fisher=squeezellm, refine=refine,
                    refine_groups=job.config.refine_groups, embed_bits=job.config.embed_bits,
                    head_bits=job.config.head_bits)
    share = ranks.local_world  # the ranks on this machine share its memory
    budget = activation_budget(plan, job.cpu_memory // share if job.cpu_memory else None,
                               available_memory() // share if share > 1 else None)
    check_gpu_memory(plan, device, job.gpu_memory)
    seconds["load"] = time.perf_counter() - t0
    yield ProgressEvent("load", 1, 1, f"opened {folder.name}: {len(lazy.blocks)} blocks")
    spill = max(0, plan.activations - budget)
    yield ProgressEvent("plan", 1, 1, f"memory: {plan.describe()}" + (f"; {spill / 2**30:.1f} GB of block inputs "
                                                                      "go to disk" if spill else ""))
    if ranks.world > 1:
        yield ProgressEvent("ranks", 1, 1, ranks.describe())
    settings = {"config": to_dict(job.config), "calibration": to_dict(job.calibration) if squeezellm else None,
                "source_model": job.model}
    options = StreamOptions(device, budget, Path(job.offload_dir).expanduser() if job.offload_dir else None,
                            job.restart, ranks)
    report = yield from StreamQuantizer(lazy, tokenizer, job.config, output, options, settings, windows).run(
        job.overwrite)
    if report is None:  # a rank other than 0: its share is done, rank 0 writes the folder
        return None
    return dataclasses.replace(report, seconds={**seconds, **report.seconds})


def _resolve_in_turn(spec: str, ranks) -> Generator[ProgressEvent, None, Path]:
    """``resolve_folder`` on rank 0 first, then on the others: a model converted into the cache (a .gguf,
    the demo) is converted once per machine, and rank 0's UserError is every rank's."""
    from core.lazy_model import resolve_folder

    folder, error = None, None
    if ranks.main:
        try:
            folder = yield from resolve_folder(spec)
        except UserError as exc:
            error = exc

    def rank0_result() -> None:
        if error is not None:
            raise error

    ranks.from_main(rank0_result)
    if folder is None:
        folder = yield from resolve_folder(spec)
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise UserError(f"{folder}: its tokenizer does not load ({exc}): copy the tokenizer files "
                        "(tokenizer.json, tokenizer_config.json) of the original model into it") from exc


def check_gpu_memory(plan, device: torch.device, gpu_memory: int | None) -> None:
    """On a GPU one block, its Fisher and one window's temporaries must fit: UserError otherwise."""
    if device.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(device)
    limit = min(free, gpu_memory) if gpu_memory else free
    need = max(plan.block + plan.window + plan.quantize, plan.top) + plan.outside_blocks
    if need > limit:
        raise UserError(f"not enough GPU memory: one block with its Fisher, the embedding and head need about "
                        f"{need / 2**30:.1f} GB but {limit / 2**30:.1f} GB is free: use --device cpu, fewer or "
                        "shorter windows (--samples, --seqlen), or free the GPU")
