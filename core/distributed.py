"""Calibration across processes: the ranks of one quantization run, over ``torch.distributed``.

Calibration windows are independent, so each rank runs the block-major pass (``core.block_pass``) on
its share of them; per block the Fisher (and refinement's H) is summed over ranks with ``all_reduce``,
the block's matrices are shared out for the k-means (largest first, to the least loaded rank) and the
packed results gathered to rank 0, which alone writes the staging shards, the resume state and the
folder. The gradients a block hands down stay with their rank; rank 0 gathers them only to write the
resume file, and on a resume sends every rank its share back.

``Ranks`` is one process: every collective is the identity, so the streaming engine has one code path
for one and for many processes. ``ProcessRanks`` joins the group torchrun (or ``squeeze quantize
--workers N``, ``core.rank_launcher``) described in the environment: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE. gloo carries CPU tensors; with CUDA the group is
"cpu:gloo,cuda:nccl", so the Fisher sums stay on the GPUs. Payloads that are not one tensor (packed
matrices, gradients, the resume state) travel as safetensors bytes with a JSON header, never pickles.
A peer that dies closes its connections, so the next collective fails at once; one that hangs fails
after ``RANK_TIMEOUT``. Either way the rank stops with ``RankLost``, one line.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from typing import Any

import torch

from core.errors import UserError
from core.units import format_bytes

RANK_TIMEOUT = datetime.timedelta(minutes=30)  # a peer that stops answering (a dead one is noticed at once)
EXIT_RANK_LOST = 3  # a rank that stopped because another one did (the launcher names the cause)


class RankLost(UserError):
    """Another rank of the run stopped (killed, crashed or unreachable); finished blocks are kept."""


def local_ranks() -> int:
    """How many ranks of this run share this machine (torchrun and the launcher set LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's rank as torchrun gave it (0 outside a group)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def cpu_cores() -> int:
    """The CPU cores this process may keep busy: the machine's, shared evenly by its local ranks."""
    return max(1, (os.cpu_count() or 1) // local_ranks())


class Ranks:
    """A run of one process: every collective below is the identity (see the module docstring)."""

    rank, world, local_world = 0, 1, 1

    @property
    def main(self) -> bool:
        """True on the rank that writes (rank 0)."""
        return self.rank == 0

    def from_main(self, make: Callable[[], Any]) -> Any:
        """``make()`` run on rank 0 and its JSON-ready value given to every rank (rank 0 gets the object
        itself); a UserError raised there is raised on every rank."""
        return make()

    def tensors_from_main(self, make: Callable[[], dict[str, torch.Tensor]], kind: str = "broadcasts"
                          ) -> dict[str, torch.Tensor]:
        """``make()`` run on rank 0, its tensors given to every rank (on the CPU)."""
        return make()

    def my_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's share of the calibration windows (int64 [n, seqlen], the same on every rank)."""
        return windows

    def sum_(self, tensors: dict[str, torch.Tensor], kind: str = "Fisher sums") -> None:
        """Sum every tensor over the ranks, in place."""

    def my_matrices(self, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.nn.Linear]:
        """The matrices of a block this rank quantizes."""
        return linears

    def gather_matrices(self, local: dict[str, dict[int, Any]], notes: dict[str, Any]
                        ) -> tuple[dict[str, dict[int, Any]], dict[str, Any]]:
        """Every rank's quantized matrices (name -> bits -> QuantizedMatrix) and JSON notes, on rank 0;
        empty dicts elsewhere."""
        return local, notes

    def gather_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Every window's handed-down gradient in window order, on rank 0 (None elsewhere)."""
        return grads

    def scatter_grads(self, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """This rank's share of rank 0's per-window gradients (a resume)."""
        return grads

    def traffic_line(self, n_blocks: int) -> str | None:
        """One line on what the ranks exchanged (None for one process)."""
        return None

    def describe(self) -> str:
        return "one process"

    def close(self) -> None:
        """Leave the group."""


class ProcessRanks(Ranks):
    """This process's place in a ``torch.distributed`` group (see the module docstring)."""

    def __init__(self, rank: int, world: int, local_world: int, backend: str) -> None:
        self.rank, self.world, self.local_world, self.backend = rank, world, local_world, backend
        self.counts = [0] * world  # windows per rank, set by my_windows
        self.traffic: dict[str, int] = {}  # bytes by kind (all_reduce: the payload each rank contributes;
        # gathers: what rank 0 received from the others; broadcasts: what rank 0 sent once)

    # ------------------------------------------------------------------ what the engine calls

    def from_main(self, make: Callable[[], Any]) -> Any:
        value: Any = None

        def payload() -> bytes:
            nonlocal value
            value = make()
            return json.dumps({"value": value}).encode()

        data = self._broadcast_bytes(payload, "broadcasts")
        return value if self.main else json.loads(data)["value"]

    def tensors_from_main(self, make: Callable[[], dict[str, torch.Tensor]], kind: str = "broadcasts"
                          ) -> dict[str, torch.Tensor]:
        made: dict[str, torch.Tensor] = {}

        def payload() -> bytes:
            made.update(make())
            return pack(made, {})

        data = self._broadcast_bytes(payload, kind)
        return made if self.main else unpack(data)[0]

    def my_windows(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.shape[0] < self.world:
            raise UserError(f"{self.world} ranks need at least {self.world} calibration windows, not "
                            f"{windows.shape[0]}: raise --samples or use fewer processes")
        parts = torch.tensor_split(windows, self.world)
        self.counts = [int(p.shape[0]) for p in parts]
        return parts[self.rank].contiguous()

    def sum_(self, tensors: dict[str, torch.Tensor], kind: str = "Fisher sums") -> None:
        import torch.distributed as dist

        with self._collective():
            for tensor in tensors.values():
                dist.all_reduce(tensor)
                self._count(kind, tensor.numel() * tensor.element_size())

    def my_matrices(self, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.nn.Linear]:
        owner = share_out({name: lin.weight.numel() for name, lin in linears.items()}, self.world)
        return {name: lin for name, lin in linears.items() if owner[name] == self.rank}

    def gather_matrices(self, local: dict[str, dict[int, Any]], notes: dict[str, Any]
                        ) -> tuple[dict[str, dict[int, Any]], dict[str, Any]]:
        tensors, meta = matrices_to_tensors(local)
        received = self._gather_bytes(b"" if self.main else pack(tensors, {"matrices": meta, "notes": notes}),
                                      "quantized matrices")
        if received is None:
            return {}, {}
        every, every_notes = dict(local), dict(notes)
        for data in received[1:]:
            part_tensors, part_meta = unpack(data)
            every.update(matrices_from_tensors(part_tensors, part_meta["matrices"]))
            every_notes.update(part_meta["notes"])
        return every, every_notes

    def gather_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        received = self._gather_bytes(b"" if self.main else pack(_numbered(grads), {}), "handed-down gradients")
        if received is None:
            return None
        every = list(grads)
        for data in received[1:]:
            every += _unnumbered(unpack(data)[0])
        return every

    def scatter_grads(self, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        import torch.distributed as dist

        with self._collective():
            if self.main:
                starts = [sum(self.counts[:r]) for r in range(self.world)]
                parts = [pack(_numbered(grads[s:s + n]), {}) for s, n in zip(starts, self.counts)]
                sizes = torch.tensor([len(p) for p in parts], dtype=torch.int64)
            else:
                sizes = torch.zeros(self.world, dtype=torch.int64)
            dist.broadcast(sizes, 0)
            longest = int(sizes.max())
            out = torch.empty(longest, dtype=torch.uint8)
            chunks = [_padded(p, longest) for p in parts] if self.main else None
            dist.scatter(out, chunks, src=0)
        if self.main:
            self._count("handed-down gradients", int(sizes.sum()) - int(sizes[0]))
            return list(grads[:self.counts[0]])
        return _unnumbered(unpack(out[:int(sizes[self.rank])].numpy().tobytes())[0])

    def traffic_line(self, n_blocks: int) -> str | None:
        total = sum(self.traffic.values())
        parts = ", ".join(f"{kind} {format_bytes(n)}" for kind, n in self.traffic.items())
        per_block = f" ({format_bytes(total / n_blocks)} per block)" if n_blocks else ""
        return f"{self.world} ranks exchanged {format_bytes(total)}{per_block}: {parts}"

    def describe(self) -> str:
        threads = torch.get_num_threads()
        windows = "; calibration windows per rank: " + "+".join(str(c) for c in self.counts) if any(self.counts) else ""
        return (f"rank {self.rank} of {self.world} ({self.backend}, {self.local_world} on this machine, {threads} "
                f"thread{'s' if threads > 1 else ''} each){windows}")

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ transport

    def _count(self, kind: str, n: int) -> None:
        self.traffic[kind] = self.traffic.get(kind, 0) + n

    def _collective(self):
        return _collective(self.rank, self.world)

    def _broadcast_bytes(self, make: Callable[[], bytes], kind: str) -> bytes:
        """Rank 0's ``make()`` on every rank; a UserError there is raised on every rank."""
        import torch.distributed as dist

        error = None
        data = b""
        if self.main:
            try:
                data = b"\x00" + make()
            except (UserError, ValueError) as exc:
                error, data = exc, b"\x01" + str(exc).encode()
        with self._collective():
            size = torch.tensor([len(data)], dtype=torch.int64)
            dist.broadcast(size, 0)
            buffer = _padded(data, int(size)) if self.main else torch.empty(int(size), dtype=torch.uint8)
            dist.broadcast(buffer, 0)
        if error is not None:
            raise error
        if self.main:
            self._count(kind, len(data) - 1)
            return data[1:]
        data = buffer.numpy().tobytes()
        if data[:1] == b"\x01":
            raise UserError(data[1:].decode())
        return data[1:]

    def _gather_bytes(self, data: bytes, kind: str) -> list[bytes] | None:
        """Every rank's ``data`` on rank 0, in rank order (None elsewhere)."""
        import torch.distributed as dist

        with self._collective():
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
            longest = max(int(s) for s in sizes)
            chunks = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)] if self.main else None
            dist.gather(_padded(data, longest), chunks, dst=0)
        if not self.main:
            return None
        self._count(kind, sum(int(s) for s in sizes[1:]))
        return [data] + [chunks[r][:int(sizes[r])].numpy().tobytes() for r in range(1, self.world)]


class _collective:
    """Turns a failed collective (a peer died, hung past RANK_TIMEOUT, or is unreachable) into RankLost."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, RuntimeError):
            return False
        from core.errors import describe_memory_error

        if describe_memory_error(exc) is not None:
            return False
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankLost(f"rank {self.rank} of {self.world} lost contact with the other processes of this run "
                       f"({reason[:160]}): one of them stopped; finished blocks are kept, run the same command "
                       "again to resume") from exc


def join_ranks(device: torch.device, workers: int = 1) -> tuple[Ranks, torch.device]:
    """The ranks this process belongs to, from the environment torchrun sets, and its device.

    One process (no WORLD_SIZE above 1): ``Ranks()`` and ``device`` unchanged. Otherwise joins the
    group (gloo; with CUDA cpu:gloo,cuda:nccl and the GPU ``LOCAL_RANK``), sets torch's threads to
    this rank's share of the cores, and returns ``ProcessRanks``.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes: unset it, or "
                        "start the ranks with torchrun") from None
    if world <= 1:
        return Ranks(), device
    rank = int(os.environ.get("RANK", "-1"))
    if workers > 1:
        raise UserError(f"--workers starts its own processes, but this one is already rank {rank} of {world} "
                        "(torchrun): give the process count to torchrun (--nproc-per-node) and leave out --workers")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: start the ranks with torchrun "
                        "(or squeeze quantize --workers N), which sets them")
    import torch.distributed as dist

    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), local_ranks()
    backend = "gloo"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"{local_world} ranks on this machine but torch sees {count} GPU(s): start one rank "
                            f"per GPU (--nproc-per-node {count}), or use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    torch.set_num_threads(cpu_cores())
    _bind_default_groups_to_none()
    with _collective(rank, world):
        dist.init_process_group(backend, timeout=RANK_TIMEOUT)
    return ProcessRanks(dist.get_rank(), dist.get_world_size(), local_world, backend), device


def _bind_default_groups_to_none() -> None:
    """Import, before the group exists, the torch modules whose functions take ``group=group.WORLD`` as a
    default argument.

    Such a default is evaluated once, at import: imported after ``init_process_group`` (transformers
    imports ``torch.distributed.nn.functional`` through its FSDP helpers when a model's config is first
    read), ten functions hold the group, so ``destroy_process_group`` in ``close`` cannot free it. Its gloo
    threads (two workers and the TCP event loop) then still run when the interpreter exits, and tearing
    them down there sometimes ends in ``std::terminate``: a rank that finished its share died by SIGABRT
    ("terminate called without an active exception") after its work was done. Imported now, the defaults
    are None and ``close`` joins those threads.
    """
    import torch.distributed.nn.functional  # noqa: F401


def share_out(sizes: dict[str, int], world: int) -> dict[str, int]:
    """name -> rank: largest first, each to the rank with the least work so far (ties: the lower rank)."""
    load = [0] * world
    owner = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: equal sizes keep the block's order
        rank = min(range(world), key=lambda r: load[r])
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


# ---------------------------------------------------------------------- payloads


def pack(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """safetensors bytes of ``tensors`` (on the CPU) carrying ``meta`` as JSON."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """``pack``'s tensors and meta."""
    from safetensors.torch import load

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return load(data), json.loads(header.get("__metadata__", {}).get("meta", "{}"))


def matrices_to_tensors(matrices: dict[str, dict[int, Any]]) -> tuple[dict[str, torch.Tensor], dict]:
    """name -> bits -> QuantizedMatrix as flat tensors and their JSON fields."""
    tensors, meta = {}, {}
    for name, by_bits in matrices.items():
        for bits, q in by_bits.items():
            key = f"{name}|{bits}"
            rows, cols, vals = q.sparse
            tensors.update({f"{key}|codes": q.codes, f"{key}|lut": q.lookup_table, f"{key}|rows": rows,
                            f"{key}|cols": cols, f"{key}|vals": vals})
            meta.setdefault(name, {})[str(bits)] = [q.n_outliers, q.n_sparse, q.weighted_error, q.relative_error]
    return tensors, meta


def matrices_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, dict[int, Any]]:
    """``matrices_to_tensors`` undone."""
    from core.quantize import QuantizedMatrix

    out: dict[str, dict[int, Any]] = {}
    for name, by_bits in meta.items():
        for bits, (n_outliers, n_sparse, weighted, relative) in by_bits.items():
            key = f"{name}|{bits}"
            sparse = (tensors[f"{key}|rows"], tensors[f"{key}|cols"], tensors[f"{key}|vals"])
            out.setdefault(name, {})[int(bits)] = QuantizedMatrix(tensors[f"{key}|codes"], tensors[f"{key}|lut"],
                                                                  sparse, n_outliers, n_sparse, weighted, relative)
    return out


def _numbered(grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"g{n}": g for n, g in enumerate(grads)}


def _unnumbered(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[f"g{n}"] for n in range(len(tensors))]


def _padded(data: bytes, size: int) -> torch.Tensor:
    buffer = torch.zeros(max(size, 1), dtype=torch.uint8)[:size]
    if data:
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buffer
