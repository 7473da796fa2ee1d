"""The staging folder of a streaming quantization: shards as blocks finish, a resume record, atomic finish.

``<parent>/.<output name>.partial/`` holds ``owner`` (host and pid of the run writing it),
``state.json`` (the job's key, the outlier thresholds, and a record per finished block),
``block-NNNNN.safetensors`` (the packed tensors of each finished block), ``grad-NNNNN.safetensors`` (the
loss gradient the last finished block handed down) and, for mixed precision, ``cand-NNNNN.safetensors``
(both widths of every matrix). Every file is written to a temporary name, flushed and renamed, and
``state.json`` is written last, so a run killed at any moment (kill -9) leaves a folder from which
the same command continues at the last finished block. A run with other settings, or
``restart=True``, starts over. The output appears only when ``finish`` renames the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from core.errors import UserError

STATE_FILE = "state.json"
OWNER_FILE = "owner"
STALE_SECONDS = 7 * 24 * 3600  # an abandoned staging folder of another output is kept this long for a resume


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def _owner_alive(text: str) -> bool:
    """True when ``host:pid`` names a live process on this host (another host's owner counts as alive)."""
    from core.litter import pid_alive

    host, _, pid = text.strip().rpartition(":")
    if host != socket.gethostname():
        return True
    return pid.isdigit() and pid_alive(int(pid))


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written under a temporary name, flushed to disk, renamed into place."""
    from safetensors.torch import save

    _fsync_write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


class Staging:
    """One output's staging folder (see the module docstring)."""

    def __init__(self, output: Path, key: dict, *, restart: bool = False) -> None:
        self.output, self.key, self.restart = output, key, restart
        self.path = staging_path(output)
        self.state: dict = {}
        self.resumed_blocks = 0

    def open(self) -> dict:
        """Take the folder: resume a dead run's work with the same key, or start empty. Returns the state."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_staging(self.output.parent, keep=self.path)
        owner = self.path / OWNER_FILE
        if owner.is_file() and _owner_alive(owner.read_text()) and \
                owner.read_text().strip() != f"{socket.gethostname()}:{os.getpid()}":
            raise UserError(f"another squeeze run ({owner.read_text().strip()}) is writing {self.output}: wait "
                            "for it to finish, or choose another output folder")
        state = self._read_state()
        if self.restart or state is None or state.get("key") != self.key:
            shutil.rmtree(self.path, ignore_errors=True)
            state = {"key": self.key, "blocks": {}}
        self.path.mkdir(parents=True, exist_ok=True)
        _fsync_write(owner, f"{socket.gethostname()}:{os.getpid()}".encode())
        for leftover in self.path.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        self.state = state
        self.resumed_blocks = len(state["blocks"])
        self.save_state()
        return state

    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.path / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def save_state(self) -> None:
        _fsync_write(self.path / STATE_FILE, json.dumps(self.state, sort_keys=True).encode())

    def block_file(self, index: int, kind: str = "block") -> Path:
        return self.path / f"{kind}-{index:05d}.safetensors"

    def block_done(self, index: int) -> bool:
        return str(index) in self.state["blocks"]

    def finish_block(self, index: int, tensors: dict[str, torch.Tensor], record: dict, *,
                     grads: list[torch.Tensor] | None, kind: str = "block") -> None:
        """Write a finished block's tensors, then the gradient handed down, then the record (last)."""
        save_tensors_atomic(self.block_file(index, kind), tensors)
        if grads is not None:  # named by block: a kill before the state below leaves the previous file valid
            save_tensors_atomic(self._grad_file(index), {f"g{n}": g for n, g in enumerate(grads)})
        self.state["blocks"][str(index)] = record
        self.save_state()
        for old in self.path.glob("grad-*.safetensors"):
            if grads is None or old != self._grad_file(index):
                old.unlink(missing_ok=True)

    def _grad_file(self, index: int) -> Path:
        return self.path / f"grad-{index:05d}.safetensors"

    def handed_down_grads(self) -> list[torch.Tensor]:
        """The gradients the last finished block handed down (one per window)."""
        from safetensors.torch import load_file

        state = load_file(self._grad_file(min(int(i) for i in self.state["blocks"])))
        return [state[f"g{n}"] for n in range(len(state))]

    def discard_grads(self) -> None:
        for old in self.path.glob("grad-*.safetensors"):
            old.unlink(missing_ok=True)

    def release(self, keep: bool = True) -> None:
        """Give the folder up without finishing: kept for a resume, or removed (``keep=False``)."""
        if keep:
            (self.path / OWNER_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.path / "activations", ignore_errors=True)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def sweep_stale_staging(parent: Path, keep: Path) -> None:
    """Remove other outputs' staging folders whose run is dead and that were last touched long ago,
    and the activation spill folders of every dead run (they are recomputed on a resume)."""
    for folder in parent.glob(".*.partial"):
        owner = folder / OWNER_FILE
        if not folder.is_dir() or (owner.is_file() and _owner_alive(owner.read_text())):
            continue
        age = time.time() - folder.stat().st_mtime  # before the sweep below touches it
        shutil.rmtree(folder / "activations", ignore_errors=True)
        if folder != keep and age > STALE_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
