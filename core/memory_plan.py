"""Memory is a number the engine knows before it starts: an estimate for a streaming run.

``plan_memory`` adds up what a block-major run holds at its peak: the parameters outside the
blocks (embedding, head, norms) in the compute dtype, one block's weights, gradients and float32
Fisher, the autograd temporaries of one window through one block, the quantization temporaries of
the block's largest matrix per worker thread, the outlier statistics, the block inputs kept in RAM
(the rest go to disk), and the runtime (Python, torch, transformers). With refinement (core.refine),
the block's gradient-weighted Hessians (groups x in_features² float32 per projection) and refinement's
larger temporaries per worker. Two other phases are planned beside the blocks' (the peak is the
largest): the loss gradients at the top (one window's logits and, when the head is quantized, its
weight gradient and float32 Fisher, each vocabulary x hidden) and the k-means of the embedding and
head at the end (``core.embed_head``: the largest table's temporaries and the head's Fisher).
``activation_budget`` compares it with what the machine has and refuses, naming the setting that
fixes it, instead of being killed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from core.errors import UserError
from core.outliers import SKETCH_SIZE

RUNTIME_BYTES = 600 << 20  # import torch + transformers + tokenizer, measured ~550 MiB
# core.embed_head.quantize_table's peak above its inputs, per weight of the table (peak RSS, 16384 x 576):
# 22-23 bytes live at 4 and 6 bits, weighted or not; up to 36 with glibc's default heap keeping freed blocks
TABLE_KMEANS_BYTES_PER_WEIGHT = 40
LOGITS_COPIES = 3  # one window's float32 logits, log-softmax and gradient at the top: 3.0-3.1 copies measured
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
    top: int = 0  # the loss gradients at the top: one window's logits, a quantized head's gradient and Fisher
    head_fisher: int = 0  # of ``top``: a quantized head's weight gradient, float32 Fisher and squared gradient
    embed_head_quantize: int = 0  # the end: k-means of the largest embedding/head table and the head's Fisher

    @property
    def sweep(self) -> int:
        """What the calibration sweep holds beside the block inputs, the parts outside the blocks and the
        runtime: its larger phase, one block (Fisher, quantization) or the loss gradients at the top."""
        return max(self.block + self.window + self.quantize + self.outlier_stats + self.hessians, self.top)

    @property
    def cpu_peak(self) -> int:
        return self.outside_blocks + self.runtime + max(self.sweep + self.activations_in_ram,
                                                         self.embed_head_quantize)

    @property
    def without_block_inputs(self) -> int:
        """The peak with every block input on disk: the least this run can be given."""
        return dataclasses.replace(self, activations_in_ram=0).cpu_peak

    @property
    def spilled(self) -> int:
        return self.activations - self.activations_in_ram

    def describe(self) -> str:
        """One line: the peak and its main parts."""
        spill = f", {_gib(self.spilled)} of block inputs on disk" if self.spilled else ""
        hessians = f", refinement's H {_gib(self.hessians)}" if self.hessians else ""
        head = f", the head's gradient and Fisher {_gib(self.head_fisher)}" if self.head_fisher else ""
        tables = f", embedding/head k-means {_gib(self.embed_head_quantize)} at the end" \
            if self.embed_head_quantize else ""
        return (f"needs about {_gib(self.cpu_peak)} of memory: one block {_gib(self.block + self.window)}, "
                f"embedding and head {_gib(self.outside_blocks)}, block inputs {_gib(self.activations_in_ram)} in "
                f"RAM{spill}, quantization {_gib(self.quantize)}{hessians}{head}{tables}, runtime "
                f"{_gib(self.runtime)}")


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
                fisher: bool = True, hessian_entries: int = 0, stored_bytes: int = 4, vocab: int = 0,
                head_fisher_entries: int = 0, largest_table: int = 0) -> MemoryPlan:
    """The estimate for a model of these sizes (counts of weights; bytes per element of the compute dtype).

    activation_budget: bytes of block inputs kept in RAM (None: all of them). hessian_entries: with
    refinement, groups x Σ in_features² over one block's projections (0: refinement off).
    stored_bytes: bytes per weight as the model's files store them (2: bf16/fp16, whose outlier statistics
    are exact value counts). vocab: logits per token at the top. head_fisher_entries: weights of the head
    whose Fisher is summed (0: the head is not quantized). largest_table: weights of the largest embedding
    or head table quantized at the end (0: both stay float16).
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
    # outlier statistics of every matrix until the multiplier is solved (core.outliers.OutlierStats): a
    # 16-bit matrix's distinct values and counts (at most 65,536 x 12 bytes), else a float32 sample
    per_matrix = min(largest_matrix, 1 << 16) * 12 if stored_bytes == 2 else min(largest_matrix, SKETCH_SIZE) * 4
    stats = per_matrix * (quantizable // max(1, largest_matrix) + n_blocks * 7)
    activations = (n_blocks + 1) * windows * seqlen * hidden * compute_bytes if fisher else 0
    in_ram = activations if activation_budget is None else min(activations, activation_budget)
    # core.block_pass.top_gradients, peak RSS measured (tests/core/test_memory_plan.py): a window's logits
    # (with the Fisher sum already held), or the head weight's gradient (compute dtype; a float32 copy of a
    # 16-bit one), the float32 sum and the squared gradient added into it, whichever is larger
    loss = LOGITS_COPIES * seqlen * vocab * 4 if fisher else 0
    head = head_fisher_entries * (compute_bytes + 8 + (4 if compute_bytes < 4 else 0)) if fisher else 0
    top = max(loss + 4 * head_fisher_entries, head) if head else loss
    tables = largest_table * TABLE_KMEANS_BYTES_PER_WEIGHT + (4 * head_fisher_entries if fisher else 0)
    return MemoryPlan(outside, block, window, quantize, stats if fisher else 0, activations, in_ram,
                      hessians=4 * hessian_entries if fisher else 0, top=top, head_fisher=head,
                      embed_head_quantize=tables if largest_table else 0)


def activation_budget(plan: MemoryPlan, cpu_memory: int | None = None, available: int | None = None) -> int:
    """Bytes of block inputs to keep in RAM so the run stays within ``cpu_memory`` (default: 85% of
    the memory free now); the rest go to disk. UserError naming the fix when even the rest does not fit.

    plan: from ``plan_memory`` with every block input in RAM (activation_budget=None).
    """
    available = available_memory() if available is None else available
    limit = min(cpu_memory, available) if cpu_memory else int(0.85 * available)
    base = plan.outside_blocks + plan.runtime + plan.sweep
    if plan.without_block_inputs <= limit:
        return limit - base
    where = f"the --cpu-memory limit of {_gib(cpu_memory)}" if cpu_memory and cpu_memory < available else \
        f"the {_gib(available)} free now"
    on_disk = dataclasses.replace(plan, activations_in_ram=0)
    if base <= limit:  # the sweep fits: the embedding and head's k-means at the end does not
        raise UserError(f"not enough memory: this run {on_disk.describe()}, more than {where}: keep the "
                        "embedding and head in float16 (--embed-bits 16 --head-bits 16), close other programs, "
                        "or raise --cpu-memory if more is free")
    raise UserError(f"not enough memory: this run {on_disk.describe()}, more than "
                    f"{where}: use fewer or shorter calibration windows (--samples, --seqlen), quantize on a GPU "
                    "(--device cuda), close other programs, or raise --cpu-memory if more is free")


def plan_for(model, windows: int, seqlen: int, fisher: bool = True, compute_dtype=None,
             refine: bool = False, refine_groups: int = 1, embed_bits: int = 16, head_bits: int = 16) -> MemoryPlan:
    """``plan_memory`` for a causal LM with every block input in RAM (refine: with core.refine's H, one
    float32 [in, in] per projection and channel group; embed_bits / head_bits: the run's widths of the
    embedding and head, below 16 quantized with the head's Fisher as ``core.embed_head`` does).

    model: a transformers model (loaded, or the meta skeleton of a ``core.lazy_model.LazyModel``) or
    a LazyModel; compute_dtype: the dtype blocks compute in (default: the LazyModel's, else float32).
    """
    import torch

    from core.models import decoder_blocks

    stored_bytes = 4
    if hasattr(model, "skeleton"):
        compute_dtype = compute_dtype or model.compute_dtype
        stored = set(model.stored_dtypes().values())
        stored_bytes = 2 if stored and stored <= {torch.bfloat16, torch.float16} else 4
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
                       hessian_entries=hessian_entries, stored_bytes=stored_bytes,
                       **_embed_head_sizes(model, embed_bits, head_bits))


def _embed_head_sizes(model, embed_bits: int, head_bits: int) -> dict[str, int]:
    """plan_memory's vocab, head_fisher_entries and largest_table for ``model`` (a transformers model, meta
    tensors allowed) at these widths, as ``core.embed_head`` quantizes the pair (a tied pair once, at the
    larger width, weighted by the head's Fisher)."""
    from core.embed_head import find_embed_head, stored_bits

    found = find_embed_head(model)
    if found is None:
        return {}
    rows, cols = model.get_parameter(found.embedding_weight).shape
    embed, head = stored_bits(embed_bits, head_bits, found.tied, int(cols))
    has_head = found.head is not None
    return {"vocab": int(rows), "head_fisher_entries": rows * cols if has_head and head < 16 else 0,
            "largest_table": rows * cols if embed < 16 or (has_head and head < 16) else 0}
