"""Block-major sensitivity: the exact Fisher diagonal with one decoder block in memory at a time.

Forward sweep: every calibration window goes through block 0, then block 1, ... (each block loaded
once); each block's input is kept in an ``ActivationStore``. At the top the model's own tail (final
norm, head, loss) gives dL_n/dh_N for every window n. Backward sweep, last block first: the block
is loaded with gradients on its projections, its forward recomputed from the stored input, the
stored output gradient back-propagated; the squared weight gradient of each window is added into
the block's float32 Fisher, and the input gradient is handed down. Per window and per weight this
is the gradient of the whole-model pass, so the Fisher equals ``core.sensitivity.compute_fisher``'s
up to float reassociation.

Architecture-neutral: the arguments each block receives (masks, rotary tables, positions) are
recorded by swapping the blocks for recorders during one real forward of the model, and the tail
is run by the model itself with the blocks swapped for pass-throughs, the first of which returns
the stored top activation.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Generator

import torch
from torch import nn

from core.activation_store import ActivationStore
from core.freed_memory import return_freed_memory
from core.lazy_model import LazyModel
from core.progress import ProgressEvent


class _Recorder(nn.Module):
    """Stands in for decoder block ``index``: records its arguments, returns a given tensor or its input."""

    def __init__(self, index: int, sink: dict, as_tuple: bool, replacement: torch.Tensor | None = None) -> None:
        super().__init__()
        self.index, self.sink, self.as_tuple, self.replacement = index, sink, as_tuple, replacement

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink[self.index] = (hidden, rest, kwargs)
        out = self.replacement if self.replacement is not None else hidden
        return (out,) if self.as_tuple else out


def block_output(result) -> torch.Tensor:
    """The hidden states a decoder block returned (transformers 5 returns a tensor, 4.x a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


def block_linears(lazy: LazyModel, index: int) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear inside block ``index`` (the names ``quantizable_linears`` gives)."""
    prefix = lazy.block_name(index)
    return {f"{prefix}.{sub}": m for sub, m in lazy.blocks[index].named_modules() if isinstance(m, nn.Linear)}


class BlockMajorPass:
    """Runs calibration windows through a ``LazyModel`` block by block (see the module docstring).

    windows: int64 [n, seqlen]; device: where blocks compute; store: where block inputs live
    (key ``"h{block}-{window}"``: float [1, seqlen, hidden] in the compute dtype).
    """

    def __init__(self, lazy: LazyModel, windows: torch.Tensor, device: torch.device, store: ActivationStore) -> None:
        self.lazy, self.windows, self.device, self.store = lazy, windows, device, store
        self.block_args: dict[int, tuple[tuple, dict]] = {}
        self.as_tuple = False
        self.losses: list[float] = []
        self.head_fisher: torch.Tensor | None = None  # set by top_gradients(head_fisher=True)

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @contextlib.contextmanager
    def _swapped(self, replacements: list[nn.Module]):
        block_list = self.lazy.skeleton.get_submodule(self.lazy.block_prefix)
        saved = [block_list[i] for i in range(len(block_list))]
        for i, module in enumerate(replacements):
            block_list[i] = module
        try:
            yield
        finally:
            for i, block in enumerate(saved):
                block_list[i] = block

    def _record(self, ids: torch.Tensor, as_tuple: bool) -> dict:
        sink: dict = {}
        with self._swapped([_Recorder(i, sink, as_tuple) for i in range(len(self.lazy.blocks))]), torch.no_grad():
            self.lazy.skeleton(input_ids=ids, use_cache=False)
        return sink

    def prepare(self) -> None:
        """Load the parts outside the blocks, record each block's arguments, store every window's h_0."""
        self.lazy.load_outside_blocks(self.device)
        ids = self.windows[:1].to(self.device)
        sink = self._record(ids, as_tuple=False)
        if len(sink) > 1 and sink[1][0] is not sink[0][0]:
            self.as_tuple, sink = True, self._record(ids, as_tuple=True)  # the model indexes layer outputs
        elif len(sink) == 1:
            self.as_tuple = "[0]" in inspect.getsource(type(self.lazy.skeleton.base_model).forward)
        self.block_args = {i: (rest, kwargs) for i, (_, rest, kwargs) in sink.items()}
        for n in range(self.n_windows):
            if f"h0-{n}" in self.store:
                continue
            one = self._record(self.windows[n:n + 1].to(self.device), self.as_tuple)
            self.store.put(f"h0-{n}", one[0][0])

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        rest, kwargs = self.block_args[index]
        return block_output(block(hidden, *rest, **kwargs))

    def forward_sweep(self, upto: int, on_block: Callable[[int, nn.Module], None] | None = None
                      ) -> Generator[ProgressEvent, None, None]:
        """Inputs of blocks 1..upto for every window (block inputs already stored are kept).

        on_block(index, loaded block) runs for every block 0..upto-1 while it is loaded.
        """
        for i in range(upto):
            block = self.lazy.load_block(i, self.device)
            try:
                with torch.no_grad():
                    for n in range(self.n_windows):
                        out = self.run_block(block, i, self.store.get(f"h{i}-{n}").to(self.device))
                        self.store.put(f"h{i + 1}-{n}", out)
                if on_block is not None:
                    on_block(i, block)
            finally:
                self.lazy.release(block)
                return_freed_memory()  # else the freed weights stay in malloc's heaps, ~100 MB per block at 1.1B
            yield ProgressEvent("forward", i + 1, upto, f"forward: block {i + 1}/{upto}")
        # h_0 of blocks below ``upto`` stays: the backward sweep recomputes every block from its input

    def top_gradients(self, head_fisher: bool = False) -> Generator[ProgressEvent, None, list[torch.Tensor]]:
        """dL_n/dh_N for every window n (CPU, compute dtype) through the model's own norm, head and loss.

        head_fisher: also sum each window's squared gradient of the output head's weight into
        ``self.head_fisher`` (float32 [vocab, hidden] on the CPU; None without a head weight): the
        Fisher that weighs a quantized head (core.embed_head). A tied head's gradient here is the
        head's part only: the embedding's output is replaced by the stored top activation.
        """
        top = len(self.lazy.blocks)
        grads = []
        self.losses = []
        head = self.lazy.skeleton.get_output_embeddings() if head_fisher else None
        weight = getattr(head, "weight", None) if head is not None else None
        fisher = torch.zeros(weight.shape, dtype=torch.float32, device=self.device) if weight is not None else None
        if weight is not None:
            weight.requires_grad_(True)
        try:
            for n in range(self.n_windows):
                hidden = self.store.get(f"h{top}-{n}").to(self.device).requires_grad_(True)
                first = _Recorder(0, {}, self.as_tuple, replacement=hidden)
                rest = [_Recorder(i, {}, self.as_tuple) for i in range(1, top)]
                ids = self.windows[n:n + 1].to(self.device)
                with self._swapped([first, *rest]):
                    loss = self.lazy.skeleton(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                if fisher is not None:
                    fisher.add_(weight.grad.float().square())
                    weight.grad = None
                grads.append(hidden.grad.detach().cpu())
                self.losses.append(float(loss.detach()))
                self.store.drop(f"h{top}-{n}")
                yield ProgressEvent("backward", 0, top, f"loss gradient: window {n + 1}/{self.n_windows}, "
                                    f"loss {float(loss.detach()):.3f}")
        finally:
            if weight is not None:
                weight.grad = None
                weight.requires_grad_(False)
        self.head_fisher = fisher.cpu() if fisher is not None else None
        return grads

    def backward_block(self, block: nn.Module, index: int, grads: list[torch.Tensor], need_input_grad: bool = True,
                       hessians: dict[str, torch.Tensor] | None = None, hessian_groups: int = 1
                       ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Fisher of loaded block ``index``'s projections and the gradients handed to the block below.

        grads: dL_n/d(output of the block) per window. Returns (name -> float32 [out, in] on the
        block's device, dL_n/d(input of the block) per window on the CPU; empty when
        ``need_input_grad`` is False). The block's weights are left without gradients.
        hessians: if a dict is given, it receives name -> float32 [in, in] on the block's device, the
        gradient-weighted Hessian Σ s_t x_t x_tᵀ of each projection (``core.refine.GradientHessians``);
        with ``hessian_groups`` G > 1, float32 [G, in, in], one per group of contiguous output rows.
        """
        from core.refine import GradientHessians

        linears = block_linears(self.lazy, index)
        fisher = {name: torch.zeros(lin.weight.shape, dtype=torch.float32, device=self.device)
                  for name, lin in linears.items()}
        below = []
        recorder = GradientHessians(linears, hessian_groups, self.device) if hessians is not None else \
            contextlib.nullcontext()
        try:
            for lin in linears.values():
                lin.weight.requires_grad_(True)
            with recorder:
                self._backward_windows(block, index, grads, need_input_grad, linears, fisher, below)
        finally:
            for lin in linears.values():
                lin.weight.grad = None
                lin.weight.requires_grad_(False)
        if hessians is not None:
            hessians.update(recorder.hessians)
        for n in range(self.n_windows):
            self.store.drop(f"h{index}-{n}")  # the block below reads its own input
        return fisher, below

    def _backward_windows(self, block: nn.Module, index: int, grads: list[torch.Tensor], need_input_grad: bool,
                          linears: dict[str, nn.Linear], fisher: dict[str, torch.Tensor], below: list) -> None:
        for n in range(self.n_windows):
            hidden = self.store.get(f"h{index}-{n}").to(self.device).requires_grad_(need_input_grad)
            with torch.enable_grad():
                out = self.run_block(block, index, hidden)
                out.backward(grads[n].to(device=self.device, dtype=out.dtype))
            for name, lin in linears.items():
                fisher[name].add_(lin.weight.grad.float().square())
                lin.weight.grad = None
            if need_input_grad:
                below.append(hidden.grad.detach().cpu())
