"""Errors a user can act on.

``UserError`` carries a message that names the problem *and* the fix. The command
line prints it as one line and exits with code 2; the studio shows it in a dialog.
Anything else that escapes is a bug and is reported with a traceback in the log.
"""

import re
import sys


class UserError(Exception):
    """A problem with the user's input (path, file, setting, memory) and how to fix it."""


class UnsupportedModelError(UserError):
    """The model has no decoder blocks with plain ``nn.Linear`` projections we can quantize."""


# Phrases of the allocators' errors: torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"),
# CUDA/HIP/MPS ("CUDA out of memory", "HIP out of memory", "MPS backend out of memory"), the C library.
_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator")
_DEVICE_MARKERS = ("cuda", "gpu", "hip", "mps", "cublas", "cudnn", "device memory")

CPU_MEMORY_ADVICE = ("out of CPU memory (RAM): use fewer or shorter windows (samples, windows, sequence "
                     "length) or a smaller model, or close other programs")
GPU_MEMORY_ADVICE = ("out of GPU memory: use fewer or shorter windows (samples, windows, sequence length, "
                     "batch size) or a smaller model, close other programs using the GPU, or run on the CPU "
                     "(device cpu)")


def describe_memory_error(exc: BaseException) -> str | None:
    """One line saying what ran out (CPU or GPU memory) and what to change; None if ``exc`` is not that.

    Recognises ``MemoryError``, ``torch.OutOfMemoryError`` and the ``RuntimeError``s torch raises
    when an allocation fails, also when they are the cause of another exception (``raise ... from``).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        message = _memory_message(exc)
        if message is not None:
            return message
        exc = exc.__cause__  # not __context__: an error raised while handling another is its own problem
    return None


def _memory_message(exc: BaseException) -> str | None:
    text = str(exc).lower()
    if isinstance(exc, MemoryError):
        return CPU_MEMORY_ADVICE
    torch = sys.modules.get("torch")  # never imported here: errors.py stays cheap to import
    out_of_memory = getattr(torch, "OutOfMemoryError", None)
    if out_of_memory is not None and isinstance(exc, out_of_memory):
        # torch raises it for accelerators; the CPU allocator raises a RuntimeError (for now)
        return CPU_MEMORY_ADVICE if "defaultcpuallocator" in text else GPU_MEMORY_ADVICE
    if isinstance(exc, RuntimeError) and any(m in text for m in _MEMORY_MARKERS):
        if "defaultcpuallocator" in text or not any(m in text for m in _DEVICE_MARKERS):
            return CPU_MEMORY_ADVICE
        return GPU_MEMORY_ADVICE
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Sentences of torch's weights-only refusal that tell the reader to turn the safety check off or to
# allowlist the code the file wants to run: a message of ours never passes that advice on.
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|if you trust|only if you got|can still be loaded|"
                            r"arbitrary code|documentation of torch\.load", re.I)


def quote_error(exc: BaseException, limit: int = 300) -> str:
    """The part of ``exc``'s message worth quoting inside a UserError: one line, at most ``limit`` chars.

    Terminal colour codes are dropped, and so is any advice to load with ``weights_only=False`` or to
    allowlist a pickled global (torch's refusal quotes it): for such a refusal the line naming the
    global the file wanted to run is kept instead.
    """
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "unsupported global" in line.lower():
            return line.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")[:limit]
    kept = []
    for line in lines:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", line) if s and not _UNSAFE_ADVICE.search(s)]
        if sentences:
            kept.append(" ".join(sentences))
    return kept[0][:limit] if kept else type(exc).__name__


def is_pickle_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is torch refusing (weights_only) to unpickle code a checkpoint asks for."""
    text = str(exc)
    return type(exc).__name__ == "UnpicklingError" and ("Weights only load failed" in text or "global" in text.lower())
