"""Quantized layers that read the same input, computed in one kernel call (q/k/v; gate/up).

In a LLaMA-family block the attention's q, k and v projections all read the same hidden state, and
so do the MLP's gate and up projections. ``link_shared_inputs(model)`` gives each such set of
``SqueezeLinear`` siblings one ``SharedInputGroup``: the first of them called with an input computes
every sibling's output in one call of the CPU kernel (one parallel region instead of three, so one
wait for the slowest thread and one Python round trip), and the others, called next with the *same
tensor object*, take theirs. Any other input, a graph that needs gradients, or a device without the
CPU kernel computes the layer alone, as before: the results are the same numbers either way.

The model code must not modify the input in place between the sibling calls (no LLaMA-family
modeling code does): inference tensors carry no version counter that could tell.
"""

from __future__ import annotations

import torch

from core import kernels
from core.layers import SqueezeLinear

# Sibling names under one parent module that read the same input in the supported architectures.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    """Sibling layers of one parent; ``output(layer, x)`` is ``layer(x)`` or None (compute it alone)."""

    def __init__(self, layers: list[SqueezeLinear]) -> None:
        self.layers = layers
        self._pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def output(self, layer: SqueezeLinear, x: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling():  # a traced graph must not depend on which call came first
            return None
        pending = self._pending  # read once: another thread may replace it
        if pending is not None and pending[0] is x:
            y = pending[1].pop(id(layer), None)
            if y is not None:
                if not pending[1]:
                    self._pending = None
                return y
        outputs = kernels.lut_matmul_many(x, [m.kernel_arguments() for m in self.layers], layer.in_features)
        if outputs is None:
            return None
        mine = None
        others = {}
        for m, y in zip(self.layers, outputs):
            if m is layer:
                mine = y
            else:
                others[id(m)] = y
        self._pending = (x, others)
        return mine


def link_shared_inputs(model: torch.nn.Module) -> int:
    """Group every set of SqueezeLinear siblings of ``model`` (see SIBLINGS); returns how many groups."""
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if (all(isinstance(m, SqueezeLinear) for m in layers)
                    and len({(m.in_features, m.qweight.device) for m in layers}) == 1):
                group = SharedInputGroup(layers)
                for m in layers:
                    m.shared_input = group
                groups += 1
    return groups
