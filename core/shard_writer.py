"""Write safetensors shards one tensor at a time, never holding more than the tensor being written.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. The format only needs
the header first: ``<u64 header length><JSON header><tensor bytes, back to back>``, and the header may
end in spaces. So each shard reserves ``header_bytes`` up front, tensor bytes are appended as they
come, and the header is written into the reserve when the shard closes (a shard also closes early
when its header would outgrow the reserve). Closing the writer names the files as transformers
does: ``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from core.folder_check import INDEX_FILE, SINGLE_FILE

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}
METADATA = {"format": "pt"}


class ShardWriter:
    """Append tensors to safetensors shards of at most ``max_shard_bytes`` of data each (a larger
    tensor gets a shard of its own) in ``folder``; ``close()`` names them and writes the index."""

    def __init__(self, folder: Path, *, max_shard_bytes: int, header_bytes: int = 256 * 1024):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.header_bytes = (header_bytes + 7) // 8 * 8  # tensor data starts 8-byte aligned
        self._shards: list[Path] = []
        self._weight_map: dict[str, int] = {}  # tensor name -> shard number
        self._handle = None
        self._entries: dict[str, dict] = {}
        self._data_bytes = 0
        self._header_estimate = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any shape; dtype in DTYPE_NAMES) under ``name``; its bytes are written now."""
        if name in self._weight_map:
            raise ValueError(f"tensor {name!r} was already written")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors here")
        nbytes = tensor.numel() * tensor.element_size()
        entry = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                 "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
        entry_chars = len(json.dumps({name: entry}, separators=(",", ":")))
        full = self._data_bytes + nbytes > self.max_shard_bytes or (
            self._header_estimate + entry_chars + 64 > self.header_bytes)
        if self._handle is not None and self._entries and full:
            self._close_shard()
            entry["data_offsets"] = [0, nbytes]
        if self._handle is None:
            self._open_shard()
        self._handle.write(_as_bytes(tensor))
        self._entries[name] = entry
        self._weight_map[name] = len(self._shards) - 1
        self._data_bytes += nbytes
        self._header_estimate += entry_chars
        self.total_bytes += nbytes

    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names, write the index; the file paths."""
        if self._handle is not None:
            self._close_shard()
        count = len(self._shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                  for i in range(count)]
        final = [self.folder / name for name in names]
        for temporary, path in zip(self._shards, final):
            temporary.rename(path)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: names[shard] for name, shard in sorted(self._weight_map.items())}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final

    def abort(self) -> None:
        """Close the open shard without finishing it (the caller removes the folder)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _open_shard(self) -> None:
        path = self.folder / f".shard-{len(self._shards) + 1:05d}.safetensors.partial"
        self._shards.append(path)
        self._handle = open(path, "wb")
        self._handle.seek(8 + self.header_bytes)
        self._entries, self._data_bytes, self._header_estimate = {}, 0, 0

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": METADATA, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.header_bytes:  # the estimate is an upper bound, so this is a bug
            raise RuntimeError(f"safetensors header of {len(header)} bytes outgrew its {self.header_bytes}")
        self._handle.seek(0)
        self._handle.write(struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" "))
        self._handle.close()
        self._handle = None


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in safetensors order (C-contiguous, little-endian), without a copy when possible."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are the same
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy().view(np.uint8))
