"""Running out of memory, anywhere, is one line saying what ran out and what to change (issue 18, item 7)."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserError, describe_memory_error
from tests.core.test_cli import one_line_error, run_cli

CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB"


@pytest.mark.parametrize("exc,what", [
    (MemoryError(), "out of CPU memory"),
    (RuntimeError(CPU_ALLOCATOR), "out of CPU memory"),
    (RuntimeError("mmap: Cannot allocate memory"), "out of CPU memory"),
    (torch.OutOfMemoryError(CUDA_OOM), "out of GPU memory"),
    (RuntimeError("HIP out of memory. Tried to allocate 1 GiB"), "out of GPU memory"),
])
def test_memory_errors_say_what_ran_out_and_what_to_change(exc, what):
    message = describe_memory_error(exc)
    assert message is not None and message.startswith(what) and "\n" not in message
    assert "smaller model" in message


def test_other_errors_are_not_memory_errors():
    assert describe_memory_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert describe_memory_error(ValueError("out of memory")) is None  # only allocation errors count
    try:
        try:
            raise MemoryError()
        except MemoryError as inner:
            raise KeyError("x") from inner
    except KeyError as outer:
        assert describe_memory_error(outer) is not None  # a wrapped allocation failure is still one


@pytest.mark.parametrize("exc,what", [
    (MemoryError(), "out of CPU memory"),
    (RuntimeError(CPU_ALLOCATOR), "out of CPU memory"),
    (torch.OutOfMemoryError(CUDA_OOM), "out of GPU memory"),
])
def test_every_command_reports_memory_as_one_line(capsys, monkeypatch, exc, what):
    import core.cli_commands as commands

    def run(args):
        raise exc

    help_text, configure, _ = commands.COMMANDS["info"]
    monkeypatch.setitem(commands.COMMANDS, "info", (help_text, configure, run))
    code, _, err = run_cli(capsys, "info", "anything")
    assert code == 2
    assert what in one_line_error(err)


def test_a_bug_still_shows_its_traceback(monkeypatch):
    import core.cli_commands as commands
    from core.cli import main

    def run(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    help_text, configure, _ = commands.COMMANDS["info"]
    monkeypatch.setitem(commands.COMMANDS, "info", (help_text, configure, run))
    with pytest.raises(RuntimeError, match="shapes"):
        main(["-q", "info", "anything"])


def test_running_out_of_memory_while_loading_is_not_called_corrupt(tmp_path, monkeypatch, demo_tokenizer):
    from transformers import AutoModelForCausalLM

    from core.models import load_model
    from tests.conftest import build_tiny_model

    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)

    def no_memory(*args, **kwargs):
        raise RuntimeError(CPU_ALLOCATOR)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_memory)
    with pytest.raises(UserError) as info:
        load_model(str(folder))
    assert "not enough memory" in str(info.value) and "out of CPU memory" in str(info.value)
    assert "corrupt" not in str(info.value)


def test_running_out_of_memory_reading_an_original_checkpoint_is_not_called_corrupt(tmp_path, monkeypatch):
    from core.interop.original_pt import read_original_state

    ckpt = tmp_path / "sq.pt"
    torch.save({"a": torch.zeros(2)}, ckpt)

    def no_memory(*args, **kwargs):
        raise RuntimeError(CPU_ALLOCATOR)

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(UserError, match="not enough memory") as info:
        read_original_state(ckpt)
    assert "corrupt" not in str(info.value)
