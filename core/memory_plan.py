"""Memory is a number the engine knows before it starts: an estimate for a streaming run.

``plan_memory`` adds up what a block-major run holds at its peak: the parameters outside the
blocks (embedding, head, norms) in the compute dtype, one block's weights, gradients and float32
Fisher, the autograd temporaries of one window through one block, the quantization temporaries of
the block's largest matrix per worker thread, the outlier statistics, the block inputs kept in RAM
(the rest go to disk), and the runtime (Python, torch, transformers). With refinement (core.refine),
the block's gradient-weighted Hessians (groups x in_features² float32 per projection) and refinement's
larger temporaries per worker. ``check_memory`` compares it
with what the machine has and refuses, naming the setting that fixes it, instead of being killed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from core.errors import UserError
from core.outliers import SKETCH_SIZE

RUNTIME_BYTES = 600 << 20  # import torch + transformers + tokenizer, measured ~550 MiB
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a streaming run needs; ``cpu_peak`` is what is compared with the machine."""

    outside_blocks: int
    block: int
    window: int
    quantize: int
    outlier_stats: int
    activations: int  # block inputs of every window, all blocks
    activations_in_ram: int
    runtime: int = RUNTIME_BYTES
    hessians: int = 0  # refinement's H of one block's projections (one [in, in] per channel group)

    @property
    def cpu_peak(self) -> int:
        return (self.outside_blocks + self.block + self.window + self.quantize + self.outlier_stats
                + self.activations_in_ram + self.runtime + self.hessians)

    @property
    def spilled(self) -> int:
        return self.activations - self.activations_in_ram

    def describe(self) -> str:
        """One line: the peak and its main parts."""
        spill = f", {_gib(self.spilled)} of block inputs on disk" if self.spilled else ""
        hessians = f", refinement's H {_gib(self.hessians)}" if self.hessians else ""
        return (f"needs about {_gib(self.cpu_peak)} of memory: one block {_gib(self.block + self.window)}, "
                f"embedding and head {_gib(self.outside_blocks)}, block inputs {_gib(self.activations_in_ram)} in "
                f"RAM{spill}, quantization {_gib(self.quantize)}{hessians}, runtime {_gib(self.runtime)}")


def _gib(n: int) -> str:
    from core.units import format_bytes

    return format_bytes(n)


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit when one is set."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 * GIB
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
            usage_file = limit_file.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            if text != "max" and int(text) < 1 << 60:
                available = min(available, int(text) - int(open(usage_file).read()))
        except (OSError, ValueError):
            continue
    return max(0, available)


def plan_memory(*, parameters: int, block_parameters: int, largest_matrix: int, quantizable: int,
                hidden: int, intermediate: int, heads: int, n_blocks: int, windows: int, seqlen: int,
                compute_bytes: int, activation_budget: int | None, threads: int | None = None,
                fisher: bool = True, hessian_entries: int = 0) -> MemoryPlan:
    """The estimate for a model of these sizes (counts of weights; bytes per element of the compute dtype).

    activation_budget: bytes of block inputs kept in RAM (None: all of them). hessian_entries: with
    refinement, groups x Σ in_features² over one block's projections (0: refinement off).
    """
    threads = threads or os.cpu_count() or 1
    outside = (parameters - block_parameters * n_blocks) * compute_bytes
    block = block_parameters * (compute_bytes + ((compute_bytes + 4) if fisher else 0))
    # autograd keeps roughly a dozen hidden-wide and four intermediate-wide tensors per token, plus
    # the attention's score matrix when the kernel materialises it
    window = (seqlen * (14 * hidden + 5 * intermediate) + heads * seqlen * seqlen) * 4 if fisher else 0
    window += 2 * seqlen * hidden * 4 * windows if fisher else 0  # gradients handed down, one boundary
    from core.quantize import LARGE_MATRIX

    parallel = 1 if largest_matrix > LARGE_MATRIX else min(threads, 8)  # as core.quantize's matrix pool
    from core.refine import REFINE_BYTES_PER_WEIGHT

    per_weight = REFINE_BYTES_PER_WEIGHT if hessian_entries else 34  # refinement follows k-means in each worker
    quantize = largest_matrix * per_weight * parallel  # fp32 copies, masks, codes, k-means (refinement) scratch
    stats = min(largest_matrix, SKETCH_SIZE) * 4 * (quantizable // max(1, largest_matrix) + n_blocks * 7)
    activations = (n_blocks + 1) * windows * seqlen * hidden * compute_bytes if fisher else 0
    in_ram = activations if activation_budget is None else min(activations, activation_budget)
    return MemoryPlan(outside, block, window, quantize, stats if fisher else 0, activations, in_ram,
                      hessians=4 * hessian_entries if fisher else 0)


def activation_budget(plan: MemoryPlan, cpu_memory: int | None = None, available: int | None = None) -> int:
    """Bytes of block inputs to keep in RAM so the run stays within ``cpu_memory`` (default: 85% of
    the memory free now); the rest go to disk. UserError naming the fix when even the rest does not fit.

    plan: from ``plan_memory`` with every block input in RAM (activation_budget=None).
    """
    available = available_memory() if available is None else available
    limit = min(cpu_memory, available) if cpu_memory else int(0.85 * available)
    base = plan.cpu_peak - plan.activations_in_ram
    if base <= limit:
        return limit - base
    where = f"the --cpu-memory limit of {_gib(cpu_memory)}" if cpu_memory and cpu_memory < available else \
        f"the {_gib(available)} free now"
    on_disk = dataclasses.replace(plan, activations_in_ram=0)
    raise UserError(f"not enough memory: this run {on_disk.describe()}, more than "
                    f"{where}: use fewer or shorter calibration windows (--samples, --seqlen), quantize on a GPU "
                    "(--device cuda), close other programs, or raise --cpu-memory if more is free")


def plan_for(model, windows: int, seqlen: int, fisher: bool = True, compute_dtype=None,
             refine: bool = False, refine_groups: int = 1) -> MemoryPlan:
    """``plan_memory`` for a causal LM with every block input in RAM (refine: with core.refine's H, one
    float32 [in, in] per projection and channel group).

    model: a transformers model (loaded, or the meta skeleton of a ``core.lazy_model.LazyModel``) or
    a LazyModel; compute_dtype: the dtype blocks compute in (default: the LazyModel's, else float32).
    """
    import torch

    from core.models import decoder_blocks

    if hasattr(model, "skeleton"):
        compute_dtype = compute_dtype or model.compute_dtype
        model = model.skeleton
    config = model.config
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "d_model", 0) or 1)
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "ffn_dim", 0) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 0) or 1)
    blocks = decoder_blocks(model)
    linears = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    matrices = [m.weight.numel() for m in linears]
    hessian_entries = refine_groups * sum(m.in_features ** 2 for m in linears) if refine else 0
    block_parameters = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    element = torch.empty(0, dtype=compute_dtype or torch.float32).element_size()
    return plan_memory(parameters=sum(p.numel() for p in model.parameters()), block_parameters=block_parameters,
                       largest_matrix=max(matrices), quantizable=sum(matrices) * len(blocks), hidden=hidden,
                       intermediate=intermediate, heads=heads, n_blocks=len(blocks), windows=windows,
                       seqlen=seqlen, compute_bytes=element, activation_budget=None, fisher=fisher,
                       hessian_entries=hessian_entries)
