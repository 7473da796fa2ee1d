"""Temporaries name their owner; leftovers of dead owners are swept, live work never (issue 18, item 6)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from core.litter import owner_is_dead, pid_alive, sweep, temp_name, temp_path


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


@pytest.fixture
def sleeping_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _name(name: str, pid: int, kind: str = "partial", host: str | None = None) -> str:
    return f".{name}.{host or socket.gethostname()}-{pid}.{kind}"


def test_temp_names_embed_host_and_pid(tmp_path):
    name = temp_name("model-f16.gguf")
    assert name == f".model-f16.gguf.{socket.gethostname()}-{os.getpid()}.partial"
    assert temp_path(tmp_path / "out", "tmp") == tmp_path / f".out.{socket.gethostname()}-{os.getpid()}.tmp"
    assert not owner_is_dead(name)  # this process is alive
    with pytest.raises(ValueError):
        temp_name("x", "bak")


def test_only_a_dead_owner_on_this_host_counts_as_dead(dead_pid, sleeping_pid):
    assert owner_is_dead(_name("out", dead_pid))
    assert owner_is_dead(_name("fisher.safetensors", dead_pid, "tmp"))
    assert not owner_is_dead(_name("out", sleeping_pid))
    assert not owner_is_dead(_name("out", os.getpid()))
    assert not owner_is_dead(_name("out", dead_pid, host="some-other-host.example"))
    for foreign in (".out.partial", ".convert-abc123", "tmpk2j3.tmp", f"out.{socket.gethostname()}-{dead_pid}.partial"):
        assert not owner_is_dead(foreign)  # not made by core.litter: never touched


def test_sweep_removes_dead_leftovers_and_keeps_live_work(tmp_path, dead_pid, sleeping_pid):
    dead_folder = tmp_path / _name("model", dead_pid)
    (dead_folder / "sub").mkdir(parents=True)
    (dead_folder / "sub" / "weights.bin").write_bytes(b"x" * 100)
    dead_file = tmp_path / _name("fisher.safetensors", dead_pid, "tmp")
    dead_file.write_bytes(b"half")
    kept = [tmp_path / _name("model", sleeping_pid), tmp_path / _name("model", os.getpid()),
            tmp_path / _name("model", dead_pid, host="elsewhere"), tmp_path / ".model.partial",
            tmp_path / "model"]
    for path in kept:
        path.mkdir()
    removed = sweep(tmp_path)
    assert sorted(removed) == sorted([dead_folder, dead_file])
    assert not dead_folder.exists() and not dead_file.exists()
    assert all(path.exists() for path in kept)
    assert sweep(tmp_path / "missing") == []


def test_fisher_cache_save_sweeps_the_folder_and_leaves_no_temporary(tmp_path, dead_pid, sleeping_pid):
    from core.sensitivity import save_fisher

    leftover = tmp_path / _name("old.safetensors", dead_pid, "tmp")
    leftover.write_bytes(b"killed mid-write")
    live = tmp_path / _name("other.safetensors", sleeping_pid, "tmp")
    live.write_bytes(b"someone is writing")
    save_fisher(tmp_path / "fisher.safetensors", {"w": torch.ones(2, 3)}, {"k": "v"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fisher.safetensors", live.name])


def test_corpus_cache_writes_sweep_too(tmp_path, dead_pid):
    from core.data import _write_atomic

    leftover = tmp_path / _name("tokens.npy", dead_pid, "tmp")
    leftover.write_bytes(b"x")
    _write_atomic(tmp_path / "tokens.npy", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.npy"]


def test_export_sweeps_the_output_folder_and_writes_under_its_own_name(tmp_path, dead_pid, sleeping_pid):
    from core.interop.export import _into_place
    from core.progress import run_to_end

    dead = tmp_path / _name("exported", dead_pid)
    live = tmp_path / _name("exported", sleeping_pid)
    dead.mkdir()
    live.mkdir()
    seen = []

    def write(tmp):
        seen.append(tmp.name)
        (tmp / "config.json").write_text("{}")
        yield from ()

    out = run_to_end(_into_place(tmp_path / "exported", False, write))
    assert (out / "config.json").is_file()
    assert seen == [temp_name("exported")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["exported", live.name])
