"""Sizes as people read them (one formatter for the command line, the studio and the reports)."""

from __future__ import annotations


def format_bytes(n: float | None, missing: str = "-") -> str:
    """1536 -> "1.5 KB", 268435456 -> "256.0 MB" (powers of 1024); None -> ``missing``."""
    if n is None:
        return missing
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
