"""Build the compiled kernels ahead of first use (``squeeze build-kernels``).

Each kind is compiled into the cache folder (cuda_ext.jit) and loaded once, so the first model
run does not pay the compile; a kind that cannot be built here gets the reason instead.
"""

from __future__ import annotations

from collections.abc import Iterable

KINDS = ("cpu", "cuda")

_HOW_TO_USE = {
    "cpu": "used automatically for CPU tensors (SQUEEZE_KERNELS=torch turns it off)",
    "cuda": "used automatically for CUDA tensors (SQUEEZE_KERNELS=torch turns it off)",
}


def build_kernels(kinds: Iterable[str] = KINDS) -> dict[str, str | None]:
    """kind -> None when its kernels are built and loaded, else why they are unavailable.

    Compiling can take minutes the first time (CUDA especially); later calls find the cache.
    ValueError for an unknown kind.
    """
    import cuda_ext

    return {kind: cuda_ext.unavailable_reason(kind) for kind in kinds}


def describe_build(results: dict[str, str | None]) -> str:
    """One line per kind, for the command line: built (and how it is used) or the reason."""
    lines = []
    for kind, reason in results.items():
        if reason is None:
            lines.append(f"{kind} kernels: built and loaded; {_HOW_TO_USE.get(kind, 'ready')}")
        else:
            lines.append(f"{kind} kernels: unavailable: {reason}")
    return "\n".join(lines)
