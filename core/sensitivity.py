"""Sensitivity: the diagonal Fisher information of every quantizable weight.

``F = sum over calibration windows n of (dL_n/dW)**2`` where ``L_n`` is the mean token
cross-entropy of window n (SPEC A.1). Only the projection weights require gradients,
the sum is kept in float32 whatever the model's dtype, and the result is cached as
safetensors keyed by the model's fingerprint and the calibration settings, so the
inspector and later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.config import CalibrationConfig, to_dict
from core.progress import ProgressEvent

CACHE_FORMAT = 1


def compute_fisher(model: torch.nn.Module, windows: torch.Tensor,
                   linears: dict[str, torch.nn.Linear]) -> Generator[ProgressEvent, None, dict[str, torch.Tensor]]:
    """Sum of squared per-window gradients for each linear's weight.

    windows: int64 [n, seqlen] token ids. linears: name -> module (from ``quantizable_linears``; add
    ``head_target(model)`` for the output head's Fisher, which weighs a quantized head).
    Returns name -> float32 [out, in] on the CPU. Yields one event per window.
    The model's ``requires_grad`` flags are restored afterwards.
    """
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    was_training = model.training
    targets = {name: lin.weight for name, lin in linears.items()}
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in targets.items()}
    device = next(iter(targets.values())).device
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in targets.values():
            w.requires_grad_(True)
        model.eval()  # dropout off: the Fisher of the deployed model
        n = windows.shape[0]
        yield ProgressEvent("fisher", 0, n, f"sensitivity: 0/{n} windows")
        for i in range(n):
            ids = windows[i:i + 1].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for name, w in targets.items():
                fisher[name].add_(w.grad.float().square())
                w.grad = None
            yield ProgressEvent("fisher", i + 1, n, f"sensitivity: {i + 1}/{n} windows, loss {loss.item():.3f}")
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {name: f.cpu() for name, f in fisher.items()}


def head_target(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """{module name: output head} of a model whose head is a linear layer over the vocabulary, else {}.

    Passed to ``compute_fisher`` with the projections, the head's Fisher is computed by the same pass
    (a tied head's includes the embedding's share of the gradient)."""
    from core.embed_head import find_embed_head

    found = find_embed_head(model)
    if found is None or found.head is None:
        return {}
    return {found.head: model.get_submodule(found.head)}


def model_fingerprint(model: torch.nn.Module, linears: dict[str, torch.nn.Linear]) -> str:
    """A short hash identifying the weights: config plus a sample of every quantizable weight."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, lin in linears.items():
        w = lin.weight.detach().reshape(-1)
        step = max(1, w.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(lin.weight.shape)).encode())
        h.update(w[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def fisher_cache_path(fingerprint: str, calibration: CalibrationConfig, source_id: str) -> Path:
    """Where the Fisher of this model and calibration setting lives in the cache."""
    from core.paths import cache_dir

    key = json.dumps({"v": CACHE_FORMAT, "model": fingerprint, "cal": to_dict(calibration),
                      "source": source_id}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "fisher" / f"{digest}.safetensors"


def source_identity(source: str) -> str:
    """Identify a text source; files also by size and modification time."""
    path = Path(source)
    if path.is_file():
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return source


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write atomically: a crash leaves either the old file or none.

    The temporary file names this process (core.litter), so the next save into the cache folder
    removes what a killed run left there.
    """
    from core.litter import sweep, temp_path

    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent)
    tmp = temp_path(path, "tmp")
    try:
        save_file({k: v.contiguous() for k, v in fisher.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cached_fisher(model: torch.nn.Module, calibration: CalibrationConfig) -> dict[str, torch.Tensor] | None:
    """The cached Fisher for this model and calibration setting, or None."""
    from core.models import quantizable_linears

    linears = quantizable_linears(model)
    path = fisher_cache_path(model_fingerprint(model, linears), calibration, source_identity(calibration.source))
    if not path.is_file():
        return None
    fisher = load_file(path)
    if set(fisher) != set(linears) | set(head_target(model)):
        return None
    return fisher


def load_or_compute_fisher(model: torch.nn.Module, tokenizer, calibration: CalibrationConfig
                           ) -> Generator[ProgressEvent, None, dict[str, torch.Tensor]]:
    """The Fisher diagonal for ``model``: from the cache, or computed on calibration windows and cached.

    Returns name -> float32 [out, in] (CPU) for every quantizable linear, and for the output head
    (``head_target``), whose Fisher weighs a quantized head (core.embed_head).
    """
    from core.data import calibration_windows, corpus_tokens
    from core.models import quantizable_linears

    linears = quantizable_linears(model)
    path = fisher_cache_path(model_fingerprint(model, linears), calibration, source_identity(calibration.source))
    targets = {**linears, **head_target(model)}
    if path.is_file():
        fisher = load_file(path)
        if set(fisher) == set(targets):
            yield ProgressEvent("fisher", 1, 1, "sensitivity: loaded from cache")
            return fisher
    yield ProgressEvent("fisher", 0, calibration.samples, "sensitivity: preparing calibration text")
    tokens = corpus_tokens(tokenizer, calibration.source)
    windows = calibration_windows(tokens, calibration.samples, calibration.seqlen, calibration.seed)
    fisher = yield from compute_fisher(model, windows, targets)
    save_fisher(path, fisher, {"calibration": json.dumps(to_dict(calibration))})
    return fisher


FISHER_CACHE_LIMIT_GB = 8.0  # larger Fishers (about 2 B quantizable weights and up) are not cached


class BlockFisherCache:
    """The Fisher of a streaming run, one safetensors file per decoder block, in the cache.

    Keyed by the model folder's fingerprint (``core.lazy_model.folder_fingerprint``) and the
    calibration setting; a later run with other quantization settings reads it instead of running
    the calibration passes. Only models whose Fisher is at most ``$SQUEEZE_FISHER_CACHE_GB``
    (default 8) GB are cached. With ``kind="hessians"`` the same class caches the gradient-weighted
    Hessians of refinement (name -> float32 [in, in]) in a sibling folder, under the same limit.
    """

    def __init__(self, fingerprint: str, calibration: CalibrationConfig, fisher_bytes: int,
                 kind: str = "blocks") -> None:
        from core.paths import cache_dir

        key = fisher_cache_path(fingerprint, calibration, source_identity(calibration.source)).stem
        self.folder = cache_dir() / "fisher" / f"{key}-{kind}"  # kind "hessians": core.refine's H per block
        limit = float(os.environ.get("SQUEEZE_FISHER_CACHE_GB", FISHER_CACHE_LIMIT_GB))
        self.enabled = fisher_bytes <= limit * 2**30

    def _file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def complete(self, n_blocks: int) -> bool:
        return self.enabled and all(self._file(i).is_file() for i in range(n_blocks))

    def get(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self._file(index))

    def put(self, index: int, fisher: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            save_fisher(self._file(index), fisher, {"block": str(index)})

    # The output head's Fisher (core.embed_head), computed by the same calibration pass.
    def has_head(self) -> bool:
        return self.enabled and (self.folder / HEAD_FILE).is_file()

    def get_head(self) -> torch.Tensor:
        return load_file(self.folder / HEAD_FILE)["head"]

    def put_head(self, fisher: torch.Tensor) -> None:
        if self.enabled:
            save_fisher(self.folder / HEAD_FILE, {"head": fisher}, {"part": "head"})


HEAD_FILE = "head.safetensors"
