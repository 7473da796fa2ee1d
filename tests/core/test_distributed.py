"""Calibration across processes: --workers, torchrun nodes, a dead rank, payloads (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.distributed import matrices_from_tensors, matrices_to_tensors, pack, share_out, unpack
from core.pipeline import load_tokenizer
from core.progress import run_to_end

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = 8


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


def _cli(folder: Path, output: Path, *extra: str, bits: int = 3) -> list[str]:
    return [sys.executable, "-m", "core.cli", "-q", "quantize", str(folder), "--bits", str(bits), "--samples", "4",
            "--seqlen", "128", "--output", str(output), *extra]


def _env(cache: Path | None = None) -> dict:
    """Fisher computed, not cached (the passes are under test); the usual cache for the compiled kernels,
    or ``cache`` with the Fisher cache on and the torch k-means (no kernel build in a fresh cache)."""
    if cache is None:
        return {**os.environ, "PYTHONPATH": str(ROOT), "SQUEEZE_FISHER_CACHE_GB": "0"}
    return {**os.environ, "PYTHONPATH": str(ROOT), "SQUEEZE_CACHE_DIR": str(cache), "SQUEEZE_FISHER_CACHE_GB": "8",
            "SQUEEZE_KERNELS": "torch"}


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def one_process(model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    _run(_cli(model_folder, root / "q"), _env())
    return root / "q"


@pytest.fixture(scope="module")
def two_workers(model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    done = _run(_cli(model_folder, root / "q", "--workers", "2"), _env())
    return root / "q", done.stderr


def _dequantized(folder: Path) -> tuple[dict[str, torch.Tensor], object]:
    from core.checkpoint import load_quantized
    from core.layers import SqueezeLinear

    model = load_quantized(folder).model
    return {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, SqueezeLinear)}, model


def _perplexity(model, tokenizer) -> float:
    from core.data import corpus_tokens, evaluation_windows
    from core.evaluate import perplexity

    windows = evaluation_windows(corpus_tokens(tokenizer, "builtin"), 4, 128)
    return run_to_end(perplexity(model, windows)).perplexity


def assert_same_but_ties(a: Path, b: Path) -> None:
    """Codes equal but where a float tie fell the other way (Fisher sums added in another order), and the
    same perplexity within 0.05%."""
    ours, model_a = _dequantized(a)
    theirs, model_b = _dequantized(b)
    assert sorted(ours) == sorted(theirs) and len(ours) == 7 * BLOCKS + 2  # the embedding and head: 6-bit codes
    for name, weight in ours.items():
        differ = float(((weight - theirs[name]).abs() > 1e-6).float().mean())
        assert differ < 0.01, (name, differ)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    tokenizer = load_tokenizer(a)
    assert _perplexity(model_a, tokenizer) == pytest.approx(_perplexity(model_b, tokenizer), rel=5e-4)


def assert_same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------- in one process


def test_quantized_matrices_travel_as_safetensors_bytes():
    from core.quantize import quantize_matrix_widths

    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    dense = quantize_matrix_widths(weight, None, (3, 4))
    sparse = quantize_matrix_widths(weight, torch.rand(16, 32), (3,), threshold=1.5, sensitivity_percent=1.0)
    assert dense[3].n_sparse == 0 and sparse[3].n_sparse > 0
    tensors, meta = matrices_to_tensors({"a.q_proj": dense, "a.k_proj": sparse})
    back_tensors, back_meta = unpack(pack(tensors, {"matrices": meta}))
    back = matrices_from_tensors(back_tensors, back_meta["matrices"])
    for name, by_bits in (("a.q_proj", dense), ("a.k_proj", sparse)):
        for bits, q in by_bits.items():
            got = back[name][bits]
            assert torch.equal(got.codes, q.codes) and torch.equal(got.lookup_table, q.lookup_table)
            assert all(torch.equal(x, y) for x, y in zip(got.sparse, q.sparse))
            assert (got.n_outliers, got.n_sparse, got.weighted_error, got.relative_error) == \
                (q.n_outliers, q.n_sparse, q.weighted_error, q.relative_error)


def test_matrices_are_shared_out_largest_first_to_the_least_loaded_rank():
    sizes = {"q": 9, "k": 3, "v": 3, "o": 9, "gate": 24, "up": 24, "down": 24}
    owner = share_out(sizes, 2)
    load = [sum(n for name, n in sizes.items() if owner[name] == r) for r in (0, 1)]
    assert abs(load[0] - load[1]) <= 3 and owner["gate"] == 0 and owner["up"] == 1
    assert set(share_out(sizes, 1).values()) == {0}


def test_too_few_windows_for_the_workers_is_refused_in_one_line(model_folder, tmp_path, capsys):
    from core.cli import main

    code = main(["-q", "quantize", str(model_folder), "--samples", "2", "--workers", "3", "--output",
                 str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--workers 3 needs at least 3 calibration windows" in err and not (tmp_path / "q").exists()


def test_a_worker_killed_by_a_signal_is_reported_with_its_last_stderr_lines(tmp_path):
    from core.rank_launcher import TAIL_LINES, _failure

    class Dead:  # a worker that already ended by a signal
        def __init__(self, code: int) -> None:
            self.returncode, self.stdout = code, None

        def poll(self) -> int:
            return self.returncode

    (tmp_path / "rank0.log").write_text("")
    (tmp_path / "rank1.log").write_text("\n".join(f"line {i}" for i in range(50)) + "\nterminate called without an "
                                        "active exception\nFatal Python error: Aborted\n\n" + "x" * 5000 + "\n")
    message = str(_failure([Dead(0), Dead(-signal.SIGABRT)], tmp_path))
    first, *tail = message.splitlines()
    assert "worker 2 of 2 was killed by SIGABRT" in first and "run the same command again" in first
    assert tail[0] == f"worker's last {TAIL_LINES} lines on stderr:" and len(tail) == TAIL_LINES + 1
    assert "  | terminate called without an active exception" in tail and "  | Fatal Python error: Aborted" in tail
    assert tail[-1].startswith("  | xxx") and len(tail[-1]) < 400  # long lines are cut
    (tmp_path / "rank1.log").write_text("")
    assert str(_failure([Dead(0), Dead(-signal.SIGKILL)], tmp_path)).count("\n") == 0  # nothing said: one line


# ---------------------------------------------------------------- across processes


def test_two_workers_write_the_folder_one_process_writes(one_process, two_workers):
    folder, stderr = two_workers
    assert "rank 0 of 2 (gloo" in stderr and "calibration windows per rank: 2+2" in stderr
    assert "2 ranks exchanged" in stderr and "Fisher sums" in stderr and "quantized matrices" in stderr
    assert not (folder.parent / f".{folder.name}.partial").exists()
    assert_same_but_ties(one_process, folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_localhost(model_folder, one_process, tmp_path):
    port = _free_port()
    output = tmp_path / "q"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(i), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"localhost:{port}", "--rdzv-id", "squeeze-test", "-m",
                               *_cli(model_folder, output)[2:]],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, results):
        assert node.returncode == 0, err
    assert sum("wrote" in out for out, _ in results) == 1, "rank 0 alone writes the folder"
    assert_same_but_ties(one_process, output)


_CLOSE_SCRIPT = """
import os, sys
from pathlib import Path
import torch
from core.distributed import join_ranks
from core.lazy_model import LazyModel

ranks, _ = join_ranks(torch.device("cpu"))
LazyModel.open(Path(sys.argv[1]))  # transformers reads the config: its imports come after the group's
ranks.from_main(lambda: None)
ranks.close()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(n for n in names if "gloo" in n))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names from /proc")
def test_closing_the_group_stops_its_threads_though_transformers_was_imported_after_it(model_folder):
    """A group still referenced after destroy_process_group keeps its gloo threads running into the
    interpreter's exit, where their teardown sometimes aborts (SIGABRT) the rank that finished first."""
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", _CLOSE_SCRIPT, str(model_folder)],
                              env={**_env(), "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err
        assert out.strip() == "[]", f"gloo threads left after close: {out.strip()}"


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children():
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError("the launcher started no worker of that rank")


def test_a_killed_worker_stops_the_run_in_one_line_and_a_rerun_resumes(model_folder, two_workers, tmp_path):
    import psutil

    output = tmp_path / "q"
    state = tmp_path / ".q.partial" / "state.json"
    run = subprocess.Popen(_cli(model_folder, output, "--workers", "2"), env=_env(),
                           stderr=subprocess.PIPE, text=True)
    worker = _rank_pid(run, 1)
    done = 0
    while run.poll() is None and done < 2:
        try:
            done = len(json.loads(state.read_text())["blocks"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    os.kill(worker, signal.SIGKILL)
    err = run.communicate(timeout=120)[1]
    assert 2 <= done < BLOCKS, "killed while blocks were left to do"
    errors = [line for line in err.splitlines() if line.startswith("squeeze: error")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "worker 2 of 2 was killed by SIGKILL" in errors[0] and "run the same command again" in errors[0]
    assert not output.exists() and (tmp_path / ".q.partial").is_dir()
    assert not [p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get("SQUEEZE_JOB")
                and str(output) in p.info["environ"]["SQUEEZE_JOB"]], "no worker is left running"

    again = _run(_cli(model_folder, output, "--workers", "2"), _env())
    assert "resuming:" in again.stderr
    assert_same_folder(two_workers[0], output)  # the same ranks, the same sums: bit for bit
    assert not (tmp_path / ".q.partial").exists()


def test_the_cached_fisher_is_shared_by_rank_0(model_folder, tmp_path):
    env = _env(tmp_path / "cache")
    _run(_cli(model_folder, tmp_path / "first", "--workers", "2"), env)  # fills the cache from 2 ranks' sums
    assert len(list((tmp_path / "cache" / "fisher").glob("*-blocks/block-*.safetensors"))) == BLOCKS
    one = _run(_cli(model_folder, tmp_path / "one", bits=4), env)
    two = _run(_cli(model_folder, tmp_path / "two", "--workers", "2", bits=4), env)
    assert "cached Fisher" in two.stderr and "Fisher sums" not in two.stderr and one.returncode == 0
    assert_same_folder(tmp_path / "one", tmp_path / "two")  # the same Fisher: k-means is the same anywhere
