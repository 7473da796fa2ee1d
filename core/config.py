"""Frozen, validated settings for every engine job.

Each field carries UI hints in ``metadata`` (label, min, max, step, tooltip) so the
studio can build forms without ``core`` knowing Qt. ``to_dict``/``from_dict`` give
the JSON stored in a quantized folder. Invalid values raise ``ValueError`` with a
message a user can act on (never ``assert``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

C = TypeVar("C")

METHODS = ("squeezellm", "rtn", "rtn-g128")
SUPPORTED_BITS = (2, 3, 4, 5, 6)  # 2 only through the API (too lossy to offer); 5 and 6 for quality per byte
BIT_CHOICES = (3, 4, 5, 6)  # what the studio and the command line offer
MIXED_RANGE = (3.0, 6.0)  # a target_bits budget: each matrix gets one of the two whole widths around it
EMBED_WIDTHS = (4, 5, 6, 8, 16)  # token embedding / output head: LUT codes of 4, 5, 6 or 8 bits, or 16 = float16
MAX_REFINE_GROUPS = 64  # refinement's channel groups: each one a float32 in x in Hessian per matrix
EMBED_WEIGHTINGS = ("frequency", "none")  # k-means weights of an untied embedding's rows (core.embed_head)


def mixed_widths(target_bits: float) -> tuple[int, int]:
    """The two widths a ``target_bits`` budget chooses between per matrix: 3.5 -> (3, 4), 4.0 -> (3, 4),
    4.3 -> (4, 5), 6.0 -> (5, 6). A whole target is the upper width (every matrix there)."""
    low = max(int(MIXED_RANGE[0]), math.ceil(target_bits) - 1)
    return low, low + 1


def _one_of(values) -> str:
    """(3, 4, 5) -> "3, 4 or 5": the choices in an error message, from the same tuple the check uses."""
    *rest, last = map(str, values)
    return f"{', '.join(rest)} or {last}" if rest else last


EMBED_WIDTHS_TEXT = f"use {_one_of(EMBED_WIDTHS[:-1])} (lookup-table codes) or 16 (float16)"


def _hint(label: str, tooltip: str, **kw: Any) -> dict[str, Any]:
    return {"label": label, "tooltip": tooltip, **kw}


def _check_range(name: str, value: float, lo: float, hi: float, fix: str) -> None:
    if not (lo <= value <= hi):
        raise ValueError(f"{name} = {value} is out of range [{lo}, {hi}]: {fix}")


@dataclass(frozen=True)
class OutlierConfig:
    """How dense-and-sparse chooses the outliers of each matrix.

    Give at most one of ``range_multiplier`` (the original's ``--range``: outliers are
    beyond Q1 - r*IQR / Q3 + r*IQR of each matrix) and ``percent`` (the share of all
    weights to treat as outliers; the engine solves for the multiplier). Neither means
    no outliers.
    """

    range_multiplier: float | None = field(default=None, metadata=_hint(
        "Outlier range (x IQR)", "Weights further than this many interquartile ranges "
        "outside the middle half of their matrix are kept exactly in the sparse part.",
        min=0.5, max=100.0, step=0.1))
    percent: float | None = field(default=0.45, metadata=_hint(
        "Outlier target (%)", "Share of all weights kept exactly as outliers; the "
        "range multiplier is solved to hit it.", min=0.0, max=10.0, step=0.05))

    def __post_init__(self) -> None:
        if self.range_multiplier is not None and self.percent is not None:
            raise ValueError("give either an outlier range multiplier or an outlier percentage, not both")
        if self.range_multiplier is not None:
            _check_range("outlier range", self.range_multiplier, 0.0, 1e6,
                         "use a positive IQR multiplier such as 1.8")
            if self.range_multiplier <= 0:
                raise ValueError("outlier range must be positive: use a multiplier such as 1.8")
        if self.percent is not None:
            _check_range("outlier percent", self.percent, 0.0, 10.0,
                         "use a percentage such as 0.45 (it is in percent)")

    @property
    def enabled(self) -> bool:
        return self.range_multiplier is not None or bool(self.percent)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how."""

    bits: int = field(default=4, metadata=_hint(
        "Bits", "Bits per dense weight: 4 keeps quality, 3 is smaller, 5 and 6 spend bytes to come closer "
        "to the original (each extra bit doubles the lookup table).", choices=BIT_CHOICES))
    method: str = field(default="squeezellm", metadata=_hint(
        "Method", "squeezellm: Fisher-weighted non-uniform; rtn / rtn-g128: uniform "
        "round-to-nearest baselines.", choices=METHODS))
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    sensitivity_percent: float = field(default=0.05, metadata=_hint(
        "Sensitive (%)", "Share of each matrix's weights with the largest Fisher "
        "information kept exactly in the sparse part.", min=0.0, max=10.0, step=0.01))
    kmeans_max_iter: int = field(default=50, metadata=_hint(
        "k-means iterations", "Upper bound of Lloyd iterations per row.", min=1, max=1000))
    seed: int = field(default=0, metadata=_hint("Seed", "Seed of the k-means++ initialisation.",
                                                min=0, max=2**31 - 1))
    target_bits: float | None = field(default=None, metadata=_hint(
        "Target bits (mixed)", "Average bits per dense weight, between 3 and 6: each matrix gets one of the "
        "two whole widths around it (3.5: 3 or 4 bits, 4.5: 4 or 5), the wider ones being those whose "
        "sensitivity-weighted error drops most per extra bit. Off: every matrix uses Bits. Quantizing "
        "takes about twice as long.", min=MIXED_RANGE[0], max=MIXED_RANGE[1], step=0.05))
    # 6 measured best (bench.embed_head, demo, 4-bit projections, tied pair at 4 / 6 / 8 / 16 bits: folder
    # 85.8 / 97.6 / 123.5 / 123.4 MB, perplexity 27.36 / 26.39 / 26.39 / 26.38): float16's quality, 21% smaller.
    embed_bits: int = field(default=6, metadata=_hint(
        "Embedding bits", "Bits per weight of the token embedding: 4, 5, 6 or 8 store it as lookup-table codes "
        "like the projections (a large share of a small model's file), 16 keeps it in float16. A tied "
        "embedding and head are stored once, at the larger of the two widths.", choices=EMBED_WIDTHS))
    head_bits: int = field(default=6, metadata=_hint(
        "Head bits", "Bits per weight of the output head (lm_head), weighted by its Fisher: 4, 5, 6 or 8, or 16 "
        "for float16.", choices=EMBED_WIDTHS))
    # "none" measured (bench.embed_head, demo with an untied 4-bit embedding): 26.53 against 26.55 by frequency.
    embed_weighting: str = field(default="none", metadata=_hint(
        "Embedding weighting", "How an untied embedding's rows are weighted in k-means: by how often each "
        "token occurs in the calibration text, or not at all (a tied one takes the head's Fisher).",
        choices=EMBED_WEIGHTINGS))
    refine: bool = field(default=False, metadata=_hint(
        "Refine codes and tables", "After k-means, refit each row's lookup table and codes against the "
        "layer's output error weighted by the loss gradients (LNQ); same file format, lower perplexity "
        "at 3 bits, slower quantizing, squeezellm only."))
    refine_groups: int = field(default=1, metadata=_hint(
        "Channel groups", "Refinement weighs each of this many contiguous groups of a matrix's output rows by "
        "their own loss gradients (it must divide every matrix's row count; each group adds one Hessian's memory "
        "and calibration time).", min=1, max=MAX_REFINE_GROUPS))

    def __post_init__(self) -> None:
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine = {self.refine!r} must be true or false")
        if isinstance(self.refine_groups, bool) or not isinstance(self.refine_groups, int) \
                or not 1 <= self.refine_groups <= MAX_REFINE_GROUPS:
            raise ValueError(f"refine groups = {self.refine_groups!r} is not supported: use a whole number from 1 "
                             f"to {MAX_REFINE_GROUPS} (1: one Hessian per matrix)")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits = {self.bits} is not supported: use {_one_of(BIT_CHOICES)}")
        for name, value in (("embed bits", self.embed_bits), ("head bits", self.head_bits)):
            if isinstance(value, bool) or value not in EMBED_WIDTHS:
                raise ValueError(f"{name} = {value!r} is not supported: {EMBED_WIDTHS_TEXT}")
        if self.embed_weighting not in EMBED_WEIGHTINGS:
            raise ValueError(f"embedding weighting {self.embed_weighting!r} is unknown: use "
                             f"{' or '.join(EMBED_WEIGHTINGS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.target_bits is not None:
            if self.method != "squeezellm":
                raise ValueError(f"a target of {self.target_bits} bits (mixed precision) needs method "
                                 f"squeezellm, not {self.method}: drop the target or use squeezellm")
            if isinstance(self.target_bits, bool) or not isinstance(self.target_bits, (int, float)):
                raise ValueError(f"target bits = {self.target_bits!r} is not a number: use e.g. 3.5")
            _check_range("target bits", self.target_bits, *MIXED_RANGE,
                         "each matrix gets 3 to 6 bits, so use an average such as 3.5")
        _check_range("sensitivity", self.sensitivity_percent, 0.0, 10.0,
                     "it is in percent, e.g. 0.05 means 0.05%")
        _check_range("k-means iterations", self.kmeans_max_iter, 1, 1000, "use e.g. 50")

    @property
    def mixed_precision(self) -> bool:
        """True when each matrix gets its own width (see ``mixed_widths``) under ``target_bits``."""
        return self.target_bits is not None

    @property
    def widths(self) -> tuple[int, ...]:
        """The widths every matrix is clustered at: ``bits``, or the two a ``target_bits`` budget chooses from."""
        return mixed_widths(self.target_bits) if self.target_bits is not None else (self.bits,)

    @property
    def dense_and_sparse(self) -> bool:
        return self.method == "squeezellm" and (self.outliers.enabled or self.sensitivity_percent > 0)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text for the Fisher pass."""

    source: str = field(default="builtin", metadata=_hint(
        "Calibration text", "'builtin' (Wikipedia excerpt), a UTF-8 text file, or a "
        "datasets name such as wikitext2 or c4 (needs hub access)."))
    samples: int = field(default=100, metadata=_hint(
        "Samples", "Number of calibration windows; more is slower and a little better.",
        min=1, max=10000))
    seqlen: int = field(default=512, metadata=_hint(
        "Sequence length", "Tokens per calibration window.", min=16, max=32768))
    seed: int = field(default=0, metadata=_hint("Seed", "Seed for drawing the windows.",
                                                min=0, max=2**31 - 1))

    def __post_init__(self) -> None:
        _check_range("calibration samples", self.samples, 1, 10000, "use e.g. 100")
        _check_range("calibration sequence length", self.seqlen, 16, 32768, "use e.g. 512")


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity protocol (defaults: ASSETS.md, 40 windows of 512 tokens)."""

    source: str = field(default="builtin", metadata=_hint(
        "Evaluation text", "'builtin', a UTF-8 text file, or a datasets name."))
    windows: int = field(default=40, metadata=_hint(
        "Windows", "Number of non-overlapping evaluation windows.", min=1, max=100000))
    seqlen: int = field(default=512, metadata=_hint(
        "Window length", "Tokens per evaluation window.", min=16, max=32768))
    batch_size: int = field(default=4, metadata=_hint(
        "Batch size", "Windows evaluated together; lower it if memory runs out.", min=1, max=256))

    def __post_init__(self) -> None:
        _check_range("evaluation windows", self.windows, 1, 100000, "use e.g. 40")
        _check_range("evaluation window length", self.seqlen, 16, 32768, "use e.g. 512")
        _check_range("batch size", self.batch_size, 1, 256, "use e.g. 4")


@dataclass(frozen=True)
class ChatConfig:
    """Generation settings for chat."""

    system_prompt: str = field(default="", metadata=_hint(
        "System prompt", "Instructions the model sees before the conversation."))
    temperature: float = field(default=0.7, metadata=_hint(
        "Temperature", "0 is greedy (deterministic); higher is more varied.", min=0.0, max=2.0, step=0.05))
    top_p: float = field(default=0.9, metadata=_hint(
        "Top-p", "Sample only from the smallest set of tokens whose probability adds up to this.",
        min=0.01, max=1.0, step=0.01))
    max_new_tokens: int = field(default=256, metadata=_hint(
        "Max new tokens", "Longest answer, in tokens.", min=1, max=8192))
    # 1.0 (off) by default: greedy decoding must give the model's own most likely answer; a penalty
    # changed the demo's "Paris" into a ramble. Users who want one ask for it.
    repetition_penalty: float = field(default=1.0, metadata=_hint(
        "Repetition penalty", "1 is off; above 1 discourages repeating earlier tokens.", min=1.0, max=2.0,
        step=0.01))

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 2.0, "use 0 for greedy or e.g. 0.7")
        _check_range("top-p", self.top_p, 0.01, 1.0, "use e.g. 0.9")
        _check_range("max new tokens", self.max_new_tokens, 1, 8192, "use e.g. 256")
        _check_range("repetition penalty", self.repetition_penalty, 1.0, 2.0, "use 1.0 to 1.3")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config dataclass from ``to_dict`` output, ignoring unknown keys."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = from_dict(sub, value)  # type: ignore[arg-type]
        kwargs[f.name] = value
    return cls(**kwargs)
