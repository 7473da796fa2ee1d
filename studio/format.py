"""Numbers as people read them: 135.5 M parameters, 257.3 MB."""

from __future__ import annotations

from core.units import format_bytes


def human_bytes(n: float | None) -> str:
    return format_bytes(n, missing="–")


def megabytes(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def human_count(n: float | None) -> str:
    if n is None:
        return "–"
    for value, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= value:
            return f"{n / value:.1f}{suffix}"
    return f"{n:.0f}"


def percent(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f} %"
