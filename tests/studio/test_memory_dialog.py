"""The studio's error dialog says what ran out of memory with the same words as the command line."""

from __future__ import annotations

import torch

from core.errors import describe_memory_error
from studio.errors import user_message


def test_dialog_message_for_gpu_and_cpu_memory_matches_the_command_line():
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    for exc, what in ((gpu, "Out of GPU memory"), (cpu, "Out of CPU memory"), (MemoryError(), "Out of CPU memory")):
        message = user_message(exc, "quantizing")
        assert message.startswith(what)
        assert describe_memory_error(exc)[1:] in message and "quantizing" in message
        assert "bug" not in message
