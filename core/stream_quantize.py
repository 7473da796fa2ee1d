"""Streaming quantization: Fisher, split, k-means and pack one decoder block at a time.

For SqueezeLLM the forward sweep of ``core.block_pass`` also condenses every matrix for the
outlier thresholds (the IQR multiplier is solved over the whole model, SPEC H.3); the backward
sweep then quantizes each block as soon as its Fisher is complete and writes its packed tensors
into the staging folder (``core.staging``), freeing the block and its Fisher. Mixed precision keeps
both widths of each matrix in a candidate file and only their errors in memory; the widths are
allocated when every block is done. The baselines (rtn, rtn-g128) need no Fisher and go block by
block directly. ``core.folder_writer`` then assembles the folder and renames it into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.activation_store import ActivationStore
from core.block_pass import BlockMajorPass, block_linears
from core.config import QuantConfig
from core.distributed import Ranks
from core.folder_writer import write_folder
from core.lazy_model import LazyModel
from core.freed_memory import return_freed_memory
from core.outliers import OutlierStats, iqr_threshold, solve_range_multiplier
from core.progress import ProgressEvent
from core.quantize import LayerReport, QuantReport, per_matrix, quantize_matrix_widths, squeeze_module
from core.staging import Staging, save_tensors_atomic

EMBED_HEAD = "embed_head"  # the staging state's record of the quantized embedding / head (core.embed_head)
EMBED_HEAD_FILE = "embed-head.safetensors"  # their tensors in the staging folder



@dataclass(frozen=True)
class StreamOptions:
    """Where blocks compute and how much of the block inputs stay in RAM."""

    device: torch.device
    activation_budget: int  # bytes of block inputs kept in RAM; the rest spill to offload_dir
    offload_dir: Path | None = None  # default: the staging folder's activations/
    restart: bool = False
    ranks: Ranks = field(default_factory=Ranks)  # the processes calibrating together (core.distributed)


def job_key(lazy: LazyModel, config: QuantConfig, calibration: dict | None, settings: dict) -> dict:
    """What must match for a staging folder to be resumed (JSON-ready)."""
    from core.checkpoint import FORMAT_VERSION
    from core.config import to_dict
    from core.lazy_model import folder_fingerprint

    return {"model": folder_fingerprint(lazy.folder), "config": to_dict(config), "calibration": calibration,
            "compute_dtype": str(lazy.compute_dtype), "format": FORMAT_VERSION,
            "source_model": settings.get("source_model")}


class StreamQuantizer:
    """One streaming run into ``output`` (see the module docstring)."""

    def __init__(self, lazy: LazyModel, tokenizer, config: QuantConfig, output: Path, options: StreamOptions,
                 settings: dict, windows: torch.Tensor | None) -> None:
        self.lazy, self.tokenizer, self.config, self.output = lazy, tokenizer, config, output
        self.options, self.settings, self.windows = options, settings, windows
        self.staging = Staging(output, job_key(lazy, config, settings.get("calibration"), settings),
                               restart=options.restart)
        self.seconds: dict[str, float] = {}
        self.n_blocks = len(lazy.blocks)
        self.refined: dict[tuple[str, int], object] = {}  # (name, bits) -> core.refine.RefineStats until written
        self.ranks = options.ranks
        self._stored_dtypes: dict[str, torch.dtype] | None = None  # read from the headers on first use

    # ------------------------------------------------------------------ the run

    def run(self, overwrite: bool) -> Generator[ProgressEvent, None, QuantReport]:
        state = self._open_staging()
        try:
            if self.staging.resumed_blocks:
                yield ProgressEvent("resume", self.staging.resumed_blocks, self.n_blocks,
                                    f"resuming: {self.staging.resumed_blocks} of {self.n_blocks} blocks already done")
            if self.config.method != "squeezellm":
                if not self.ranks.main:
                    return None  # nothing to calibrate: rank 0 rounds every block itself
                yield from self._baseline_blocks()
            elif len(state["blocks"]) < self.n_blocks:
                yield from self._squeezellm_blocks()
            if not self.ranks.main:
                return None  # rank 0 writes the rest
            traffic = self.ranks.traffic_line(self.n_blocks)
            if traffic:
                yield ProgressEvent("ranks", 1, 1, traffic)
            if self.config.target_bits is not None and "allocation" not in state:
                yield from self._allocate()
            if EMBED_HEAD not in state and (self.config.embed_bits < 16 or self.config.head_bits < 16):
                yield from self._quantize_embed_head()
            report = self._report()
            t0 = time.perf_counter()
            yield from write_folder(self.lazy, self.tokenizer, self.staging, self.settings, report, self.output,
                                    overwrite)
            self.seconds["save"] = self.seconds.get("save", 0.0) + time.perf_counter() - t0
        except (GeneratorExit, KeyboardInterrupt):
            if self.ranks.main:
                self.staging.release(keep=bool(self.staging.state["blocks"]))  # cancelled: finished blocks stay
            raise
        except BaseException:
            if self.ranks.main:
                self.staging.release(keep=True)  # a crash or a kill: the same command continues
            raise
        return QuantReport(report.config, report.range_multiplier, report.layers, report.n_weights,
                           report.quantized_bytes, dict(self.seconds))

    def _open_staging(self) -> dict:
        """Rank 0 takes the staging folder (resuming what it holds); the other ranks get its state, never write."""
        state = self.ranks.from_main(self.staging.open)
        if not self.ranks.main:
            self.staging.state, self.staging.resumed_blocks = state, len(state["blocks"])
        return state

    def _lap(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - t0
        return now

    def _baseline_blocks(self) -> Generator[ProgressEvent, None, None]:
        from core.baselines import rtn_module

        group = 128 if self.config.method == "rtn-g128" else None
        for i in range(self.n_blocks):
            if self.staging.block_done(i):
                continue
            t0 = time.perf_counter()
            block = self.lazy.load_block(i, "cpu")
            try:
                modules = {name: rtn_module(lin, self.config.bits, group) for name, lin in
                           block_linears(self.lazy, i).items()}
                self._write_block(i, block, {n: (m, None) for n, m in modules.items()}, grads=None)
            finally:
                self.lazy.release(block)
            self._lap("quantize", t0)
            yield ProgressEvent("quantize", i + 1, self.n_blocks, f"round-to-nearest: block {i + 1}/{self.n_blocks}",
                                item=self.lazy.block_name(i))

    def _fisher_cache(self):
        from core.config import CalibrationConfig, from_dict
        from core.sensitivity import BlockFisherCache

        calibration = from_dict(CalibrationConfig, self.settings["calibration"])
        quantizable = sum(lin.weight.numel() for i in range(self.n_blocks)
                          for lin in block_linears(self.lazy, i).values())
        return BlockFisherCache(self.staging.key["model"], calibration, 4 * quantizable)

    def _hessian_cache(self):
        """The cache of refinement's gradient-weighted Hessians (None when refinement is off)."""
        if not self.config.refine:
            return None
        from core.config import CalibrationConfig, from_dict
        from core.sensitivity import BlockFisherCache

        calibration = from_dict(CalibrationConfig, self.settings["calibration"])
        groups = self.config.refine_groups  # H of other groups is another cache: never [in, in] for [G, in, in]
        size = sum(lin.in_features ** 2 for i in range(self.n_blocks) for lin in block_linears(self.lazy, i).values())
        return BlockFisherCache(self.staging.key["model"], calibration, 4 * groups * size,
                                kind="hessians" if groups == 1 else f"hessians-g{groups}")

    def _squeezellm_blocks(self) -> Generator[ProgressEvent, None, None]:
        cache, hcache = self._fisher_cache(), self._hessian_cache()
        need_head = self._needs_head_fisher()
        if self.ranks.from_main(lambda: cache.complete(self.n_blocks) and (
                hcache is None or hcache.complete(self.n_blocks)) and (not need_head or cache.has_head())):
            if need_head and self.ranks.main:
                save_tensors_atomic(self._head_fisher_file(), {"head": cache.get_head()})
            yield from self._blocks_from_cached_fisher(cache, hcache)
            return
        state = self.staging.state
        done = [int(i) for i in state["blocks"]]
        start = min(done) - 1 if done else self.n_blocks - 1  # the backward sweep goes down
        spill = self.staging.path / "activations"
        offload = self.options.offload_dir
        if offload is None and not self.ranks.main:  # the staging folder is rank 0's
            offload = Path(tempfile.gettempdir()) / "squeeze-activations"
        if offload is not None:  # a folder others may use too: a name of this run's own
            from core.litter import sweep, temp_path

            offload.mkdir(parents=True, exist_ok=True)
            sweep(offload)
            spill = temp_path(offload / "squeeze-activations")
        store = ActivationStore(self.options.activation_budget, spill)
        passer = BlockMajorPass(self.lazy, self.ranks.my_windows(self.windows), self.options.device, store)
        try:
            t0 = time.perf_counter()
            passer.prepare()
            stats: dict[str, OutlierStats | tuple[float, float]] = {}
            need_stats = "outliers" not in state
            upto = self.n_blocks if not done else start
            yield ProgressEvent("forward", 0, upto, f"forward: {passer.n_windows} windows through {upto} blocks")
            condensing = self.seconds.get("outliers", 0.0)
            condense = (lambda i, b: self._condense(i, stats)) if need_stats and self.ranks.main else None
            yield from passer.forward_sweep(upto, condense)
            t0 = self._lap("forward", t0)
            self.seconds["forward"] -= self.seconds.get("outliers", 0.0) - condensing  # counted as "outliers"
            if need_stats:  # the weights' statistics, condensed by rank 0
                state["outliers"] = self.ranks.from_main(lambda: self._thresholds(stats))
                if self.ranks.main:
                    self.staging.save_state()
                stats.clear()
            self.seconds["outliers"] = self.seconds.get("outliers", 0.0)
            if done:
                grads = self.ranks.scatter_grads(self.staging.handed_down_grads() if self.ranks.main else None)
            else:
                grads = yield from passer.top_gradients(head_fisher=need_head)
                if passer.head_fisher is not None:  # kept for the head's k-means at the end (and a resume)
                    self.ranks.sum_({"head": passer.head_fisher}, "head Fisher sums")
                    if self.ranks.main:
                        save_tensors_atomic(self._head_fisher_file(), {"head": passer.head_fisher})
                        cache.put_head(passer.head_fisher)
                    passer.head_fisher = None
            t0 = self._lap("backward", t0)
            for i in range(start, -1, -1):
                block = self.lazy.load_block(i, self.options.device)
                try:
                    hessians = {} if hcache is not None else None
                    fisher, grads = passer.backward_block(block, i, grads, need_input_grad=i > 0, hessians=hessians,
                                                          hessian_groups=self.config.refine_groups)
                    self.ranks.sum_(fisher)
                    if hessians is not None:
                        self.ranks.sum_(hessians, "H sums")
                    if self.ranks.main:
                        cache.put(i, fisher)
                        if hcache is not None:
                            hcache.put(i, hessians)
                    t0 = self._lap("backward", t0)
                    yield ProgressEvent("backward", self.n_blocks - i, self.n_blocks,
                                        f"sensitivity: block {i + 1} of {self.n_blocks} (last first)",
                                        item=self.lazy.block_name(i))
                    quantized = yield from self._quantize_block(i, fisher, hessians)
                    del fisher, hessians
                    below = self.ranks.gather_grads(grads) if i > 0 else None
                    if self.ranks.main:
                        self._write_block(i, block, quantized, grads=below)
                finally:
                    self.lazy.release(block)
                t0 = self._lap("quantize", t0)
                yield ProgressEvent("quantize", self.n_blocks - i, self.n_blocks,
                                    f"quantized block {i + 1} of {self.n_blocks}", item=self.lazy.block_name(i))
            if self.ranks.main:
                self.staging.discard_grads()
        finally:
            store.close()

    def _blocks_from_cached_fisher(self, cache, hcache=None) -> Generator[ProgressEvent, None, None]:
        """The same run with every block's Fisher from the cache: no calibration passes."""
        state = self.staging.state
        t0 = time.perf_counter()
        if "outliers" not in state:
            stats: dict = {}
            for i in range(self.n_blocks if self.ranks.main else 0):  # the weights' statistics: rank 0's
                block = self.lazy.load_block(i, "cpu")
                try:
                    self._condense(i, stats)
                finally:
                    self.lazy.release(block)
                yield ProgressEvent("forward", i + 1, self.n_blocks, f"outlier statistics: block {i + 1}")
            state["outliers"] = self.ranks.from_main(lambda: self._thresholds(stats))
            if self.ranks.main:
                self.staging.save_state()
        t0 = time.perf_counter()
        yield ProgressEvent("backward", self.n_blocks, self.n_blocks, "sensitivity: from the cache")
        for i in range(self.n_blocks - 1, -1, -1):
            if self.staging.block_done(i):
                continue
            block = self.lazy.load_block(i, self.options.device)
            try:
                fisher = self.ranks.tensors_from_main(lambda: cache.get(i), "cached Fisher")
                hessians = self.ranks.tensors_from_main(lambda: hcache.get(i), "cached H") if hcache else None
                quantized = yield from self._quantize_block(i, fisher, hessians)
                if self.ranks.main:
                    self._write_block(i, block, quantized, grads=None)
            finally:
                self.lazy.release(block)
            t0 = self._lap("quantize", t0)
            yield ProgressEvent("quantize", self.n_blocks - i, self.n_blocks,
                                f"quantized block {i + 1} of {self.n_blocks}", item=self.lazy.block_name(i))

    # ------------------------------------------------------------------ embedding and head

    def _needs_head_fisher(self) -> bool:
        """True when the head's Fisher weighs a quantized matrix: a quantized head, or a quantized tied pair
        (stored at the larger of the two widths: 6 / 16 keeps it in float16)."""
        from core.embed_head import find_embed_head, stored_bits

        found = find_embed_head(self.lazy.skeleton)
        if found is None or found.head is None:
            return False
        row_width = self.lazy.skeleton.get_parameter(found.embedding_weight).shape[1]
        return stored_bits(self.config.embed_bits, self.config.head_bits, found.tied, row_width)[1] < 16

    def _head_fisher_file(self) -> Path:
        return self.staging.path / "head-fisher.safetensors"

    def _quantize_embed_head(self) -> Generator[ProgressEvent, None, None]:
        """k-means of the embedding and head (core.embed_head) into the staging folder, once per run."""
        from safetensors.torch import load_file

        from core.embed_head import find_embed_head, quantized_modules, record, state_tensors, stored_bits

        t0 = time.perf_counter()
        found = find_embed_head(self.lazy.skeleton)
        row_width = self.lazy.skeleton.get_parameter(found.embedding_weight).shape[1] if found else 0
        embed_bits, head_bits = stored_bits(self.config.embed_bits, self.config.head_bits, bool(found and found.tied),
                                            row_width)
        widths = f"embedding {embed_bits}, head {head_bits} bits"
        yield ProgressEvent("quantize", self.n_blocks, self.n_blocks, f"embedding and head: k-means ({widths})")
        self.lazy.load_outside_blocks("cpu")  # loads only what is still on meta
        fisher_file = self._head_fisher_file()
        head_fisher = load_file(fisher_file)["head"] if fisher_file.is_file() else None
        multiplier = (self.staging.state.get("outliers") or {}).get("multiplier")
        replacements = quantized_modules(self.lazy.skeleton, self.config, head_fisher, self.windows, multiplier)
        save_tensors_atomic(self.staging.path / EMBED_HEAD_FILE, state_tensors(replacements))
        self.staging.state[EMBED_HEAD] = record(self.lazy.skeleton, replacements) or {}
        self.staging.save_state()
        fisher_file.unlink(missing_ok=True)
        self._lap("quantize", t0)

    # ------------------------------------------------------------------ outliers

    def _condense(self, index: int, stats: dict) -> None:
        """Each projection's quartiles (fixed multiplier) or OutlierStats (solved multiplier).

        Weights stored in 16 bits are condensed in their stored dtype (exact: the compute copy holds
        the same values) by counting bit patterns: linear time, and a few kilobytes per matrix kept until
        the multiplier is solved over the whole model.
        """
        t0 = time.perf_counter()
        if self.config.outliers.enabled:
            if self._stored_dtypes is None:
                self._stored_dtypes = self.lazy.stored_dtypes()
            stored = self._stored_dtypes
            for name, lin in block_linears(self.lazy, index).items():
                dtype = stored.get(f"{name}.weight", lin.weight.dtype)
                sixteen_bit = dtype in (torch.bfloat16, torch.float16)
                condensed = OutlierStats.of(lin.weight.to(dtype) if sixteen_bit else lin.weight)
                fixed = self.config.outliers.range_multiplier is not None
                stats[name] = (condensed.q1, condensed.q3) if fixed else condensed
        self._lap("outliers", t0)

    def _thresholds(self, stats: dict) -> dict:
        outliers = self.config.outliers
        if not outliers.enabled:
            return {"multiplier": None, "thresholds": {}}
        r = outliers.range_multiplier
        if r is None:
            r = solve_range_multiplier(list(stats.values()), outliers.percent)
        thresholds = {}
        for name, s in stats.items():
            q1, q3 = (s.q1, s.q3) if isinstance(s, OutlierStats) else s
            thresholds[name] = iqr_threshold(q1, q3, r)
        return {"multiplier": r, "thresholds": thresholds}

    # ------------------------------------------------------------------ one block

    def _quantize_block(self, index: int, fisher: dict[str, torch.Tensor],
                        hessians: dict[str, torch.Tensor] | None = None
                        ) -> Generator[ProgressEvent, None, dict[str, tuple]]:
        """name -> (module or {bits: module}, weighted errors) for every projection of block ``index``.

        hessians: name -> float32 [in, in] when refinement is on (core.refine runs after k-means).
        """
        config = self.config
        thresholds = self.staging.state["outliers"]["thresholds"]
        widths = config.widths
        linears = block_linears(self.lazy, index)
        timings: dict[str, float] = {}

        def job(name: str, lin: nn.Linear, target: torch.device):
            by_bits = quantize_matrix_widths(lin.weight.to(target), fisher[name].to(target), widths,
                                             threshold=thresholds.get(name),
                                             sensitivity_percent=config.sensitivity_percent,
                                             max_iter=config.kmeans_max_iter, seed=config.seed, timings=timings)
            if hessians is not None:
                by_bits = self._refine(name, lin.weight.to(target), fisher[name].to(target), by_bits,
                                       hessians[name].to(target), timings)
            return by_bits

        local = {}
        mine = self.ranks.my_matrices(linears)  # the block's matrices are shared out over the ranks
        with contextlib.closing(per_matrix(mine, self.options.device, job)) if mine else \
                contextlib.nullcontext(()) as matrices:
            for name, lin, by_bits in matrices:
                local[name] = by_bits
                yield ProgressEvent("quantize", self.n_blocks - index - 1, self.n_blocks,
                                    f"block {index + 1}: {name.rsplit('.', 1)[-1]} quantized ({by_bits[widths[0]].n_sparse} "
                                    "sparse)", item=name)
        for key, value in timings.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        notes = {name: {str(bits): dataclasses.asdict(self.refined.pop((name, bits))) for bits in by_bits
                        if (name, bits) in self.refined} for name, by_bits in local.items()}
        every, notes = self.ranks.gather_matrices(local, {name: n for name, n in notes.items() if n})
        if notes:
            from core.refine import RefineStats

            self.refined.update({(name, int(bits)): RefineStats(**stats) for name, by_bits in notes.items()
                                 for bits, stats in by_bits.items()})
        return {name: {bits: (squeeze_module(q, bits, lin), q) for bits, q in every[name].items()}
                for name, lin in linears.items() if name in every}  # rank 0: every matrix; elsewhere none

    def _refine(self, name: str, weight: torch.Tensor, fisher: torch.Tensor, by_bits: dict, hessian: torch.Tensor,
                timings: dict[str, float]) -> dict:
        """``by_bits`` with every width refined (core.refine); the objectives go to ``self.refined``."""
        from core.refine import refine_matrix

        refined = {}
        for bits, q in by_bits.items():
            refined[bits], stats = refine_matrix(weight, fisher, q, hessian)
            self.refined[(name, bits)] = stats
            timings["refine"] = timings.get("refine", 0.0) + stats.seconds
        return refined

    def _write_block(self, index: int, block: nn.Module, quantized: dict, *, grads) -> None:
        """Pack block ``index``: every projection's chosen parts, the block's other tensors as stored."""
        prefix = self.lazy.block_name(index)
        tensors = self.lazy.stored_state(block, prefix, skip=set(quantized))
        layers, modules, candidates = [], {}, {}
        for name, parts in quantized.items():
            if not isinstance(parts, dict):  # a baseline module
                module, q = parts
                modules[name] = module.layout()
                tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
                layers.append(_layer_record(name, module, q))
                continue
            tried = [[bits, q.weighted_error] for bits, (_, q) in parts.items()]
            for bits, (module, q) in parts.items():
                key = name if len(parts) == 1 else f"{bits}/{name}"
                tensors.update({f"{key}.{k}": v for k, v in module.state_dict().items()})
                record = {**_layer_record(name, module, q), "weighted_errors": tried, "layout": module.layout()}
                stats = self.refined.pop((name, bits), None)
                if stats is not None:
                    record["refine_objective"] = [stats.objective_before, stats.objective_after]
                if len(parts) == 1:
                    modules[name] = module.layout()
                    layers.append(record)
                else:
                    candidates.setdefault(name, {})[str(bits)] = record
        record = {"layers": layers, "modules": modules, "candidates": candidates}
        self.staging.finish_block(index, tensors, record, grads=grads, kind="cand" if candidates else "block")
        return_freed_memory()  # the block's temporaries, freed inside malloc's heaps, go back to the system

    # ------------------------------------------------------------------ mixed precision

    def _allocate(self) -> Generator[ProgressEvent, None, None]:
        from core.mixed_precision import allocate_bits

        t0 = time.perf_counter()
        blocks = self.staging.state["blocks"]
        numel, errors = {}, {}
        for index in range(self.n_blocks):
            for name, by_bits in blocks[str(index)]["candidates"].items():
                first = next(iter(by_bits.values()))
                numel[name] = first["shape"][0] * first["shape"][1]
                errors[name] = {int(b): r["weighted_error"] for b, r in by_bits.items()}
        allocation = allocate_bits(numel, errors, self.config.target_bits)
        from safetensors.torch import load_file

        for index in range(self.n_blocks):
            record = blocks[str(index)]
            if record.get("allocated"):
                continue
            cand = load_file(self.staging.block_file(index, "cand"))
            tensors = {k: v for k, v in cand.items() if "/" not in k}
            for name, by_bits in record["candidates"].items():
                bits = allocation[name]
                chosen = by_bits[str(bits)]
                record["modules"][name] = chosen["layout"]
                record["layers"].append(chosen)
                prefix = f"{bits}/{name}."
                tensors.update({name + "." + k[len(prefix):]: v for k, v in cand.items() if k.startswith(prefix)})
            save_tensors_atomic(self.staging.block_file(index, "block"), tensors)
            record["allocated"] = True
            self.staging.save_state()
            self.staging.block_file(index, "cand").unlink(missing_ok=True)
            yield ProgressEvent("allocate", index + 1, self.n_blocks, f"block {index + 1}: widths chosen")
        self.staging.state["allocation"] = True
        self.staging.save_state()
        self._lap("allocate", t0)

    # ------------------------------------------------------------------ the folder

    def _report(self) -> QuantReport:
        from core.config import to_dict

        layers, n_weights, n_bytes = [], 0, 0
        for index in range(self.n_blocks):
            for rec in self.staging.state["blocks"][str(index)]["layers"]:
                layers.append(LayerReport(rec["name"], tuple(rec["shape"]), rec["bits"], rec["outliers"], rec["sparse"],
                                          rec["weighted_error"], rec["relative_error"],
                                          tuple((int(b), float(e)) for b, e in rec.get("weighted_errors", ())),
                                          tuple(rec["refine_objective"]) if "refine_objective" in rec else None))
                n_weights += rec["shape"][0] * rec["shape"][1]
                n_bytes += rec["bytes"]
        multiplier = (self.staging.state.get("outliers") or {}).get("multiplier")
        return QuantReport(to_dict(self.config), multiplier, tuple(layers), n_weights, n_bytes, dict(self.seconds))


def _layer_record(name: str, module: nn.Module, q) -> dict:
    """JSON-ready LayerReport fields plus the packed bytes of ``module`` (q: QuantizedMatrix or None)."""
    return {"name": name, "shape": [module.out_features, module.in_features], "bits": int(module.bits),
            "outliers": q.n_outliers if q is not None else 0, "sparse": q.n_sparse if q is not None else 0,
            "weighted_error": q.weighted_error if q is not None else 0.0,
            "relative_error": q.relative_error if q is not None else 0.0, "bytes": int(module.storage_bytes())}
