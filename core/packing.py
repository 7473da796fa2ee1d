"""Bit packing of k-means codes in the original's (GPTQ) layout, and the CSR sparse part.

Codes are packed along the input dimension, 32 inputs at a time: the ``32 * bits`` bits of a
group fill ``bits`` int32 words as one little-endian bit stream, code ``k`` of the group at
stream bits ``bits*k .. bits*k + bits - 1`` (SPEC A.6). For 2, 4 and 8 bits no code crosses a
word (4-bit: word w of a column = sum_t C[8w+t] << 4t; 8-bit: one byte per code); for 3 bits codes
10 and 21 of each group are split across two words, exactly as GPTQ / SqueezeLLM pack them, and
for 5 and 6 bits codes straddle words likewise (5 and 6 bits: the widest projections; the token
embedding and output head take 4, 5, 6 or 8 bits, ``core.embed_head``). Words are stored as int32
holding the uint32 bit pattern, so a word with its top bit set reads as negative.

An input dimension that is not a multiple of 32 is padded with code 0 (SPEC H.4); callers keep
the true ``in_features`` to cut the padding off again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP = 32  # inputs per packing group: 32 codes of b bits fill exactly b words
_WORD_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class StreamCodec:
    """Packs groups of 32 codes of ``bits`` bits into ``bits`` words as one bit stream.

    Works on the transposed layout the packed weight has (inputs along dim 0, outputs along
    dim 2), so every step is one whole-slice operation over the output columns.
    """

    bits: int

    def _positions(self):
        """(k, word, shift) of each code k of a group: it starts at bit ``shift`` of ``word``."""
        return [(k, *divmod(self.bits * k, 32)) for k in range(GROUP)]

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [groups, 32, out] (values < 2**bits) -> words int64 [groups, bits, out] (uint32 values)."""
        words = torch.zeros(codes.shape[0], self.bits, codes.shape[2], dtype=torch.int64, device=codes.device)
        for k, word, shift in self._positions():
            words[:, word] |= (codes[:, k] << shift) & _WORD_MASK
            if shift + self.bits > 32:  # the code straddles two words: its high bits start the next
                words[:, word + 1] |= codes[:, k] >> (32 - shift)
        return words

    def unpack(self, words: torch.Tensor) -> torch.Tensor:
        """words int32 [groups, bits, out] -> codes int32 [groups, 32, out].

        int32 right shifts copy the sign bit, so every part is masked to its own width.
        """
        parts = []
        for k, word, shift in self._positions():
            low_bits = min(self.bits, 32 - shift)
            code = (words[:, word] >> shift) & ((1 << low_bits) - 1)
            if low_bits < self.bits:  # masking first keeps the left shift small and positive
                code = code | ((words[:, word + 1] & ((1 << (self.bits - low_bits)) - 1)) << low_bits)
            parts.append(code)
        return torch.stack(parts, dim=1)


# Adding a width is one entry here (any width from 1 to 8 works with the stream layout) and one in the
# CPU kernel's width checks (cuda_ext/csrc/cpu_lut.cpp, cpu_lut_decode.h). 2-6 bits: the projections;
# 4, 5, 6 and 8 bits: the token embedding and the output head (core.embed_head).
CODECS: dict[int, StreamCodec] = {bits: StreamCodec(bits) for bits in (2, 3, 4, 5, 6, 8)}


def codec_for(bits: int) -> StreamCodec:
    """The codec for ``bits`` (ValueError naming the supported widths otherwise)."""
    try:
        return CODECS[bits]
    except KeyError:
        raise ValueError(f"{bits}-bit codes cannot be packed: supported widths are {sorted(CODECS)}") from None


def packed_rows(in_features: int, bits: int) -> int:
    """Number of int32 rows of qweight for ``in_features`` inputs: ceil(in / 32) * bits."""
    return math.ceil(in_features / GROUP) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes integer [out, in] (values < 2**bits; uint8 usually) -> qweight int32 [ceil(in/32)*bits, out].

    The input dimension is padded with code 0 to a multiple of 32. Column ``n`` of qweight holds
    the codes of output row ``n``, as in the original (inputs run down the columns).
    """
    codec = codec_for(bits)
    if codes.dim() != 2 or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer [out, in] tensor, got {codes.dtype} {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, got [{lo}, {hi}]")
    c = torch.nn.functional.pad(codes.t().to(torch.int64), (0, 0, 0, -in_features % GROUP))
    words = codec.pack(c.view(-1, GROUP, out_features)).view(-1, out_features)
    # uint32 pattern -> int32: values >= 2**31 wrap to negative, bits unchanged.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack_codes_transposed(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [ceil(in/32)*bits, out] -> codes int32 [in_features, out] (padding dropped).

    The transposed result is what a dequantizer wants: no copy across the packed layout.
    """
    codec = codec_for(bits)
    if qweight.dim() != 2 or qweight.shape[0] != packed_rows(in_features, bits) or qweight.dtype != torch.int32:
        raise ValueError(f"qweight {qweight.dtype} {tuple(qweight.shape)} does not hold {in_features} "
                         f"{bits}-bit inputs: expected int32 with {packed_rows(in_features, bits)} rows")
    out_features = qweight.shape[1]
    codes = codec.unpack(qweight.reshape(-1, bits, out_features))
    return codes.view(-1, out_features)[:in_features]


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [ceil(in/32)*bits, out] -> codes uint8 [out, in_features] (padding dropped)."""
    return unpack_codes_transposed(qweight, bits, in_features).to(torch.uint8).t().contiguous()


def dense_to_csr(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of ``values`` where ``mask`` is set, as CSR over rows.

    values float [out, in], mask bool [out, in] -> (rows int32 [out+1] row pointer,
    cols int32 [nnz], vals float32 [nnz]) in row-major order with sorted columns per row.
    An entry whose value is 0 is kept when its mask is set (nnz == mask.sum()).
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must be the same [out, in]")
    mask = mask.to(torch.bool)
    rows = torch.zeros(values.shape[0] + 1, dtype=torch.int32, device=values.device)
    rows[1:] = mask.sum(dim=1).cumsum(0)
    cols = mask.nonzero()[:, 1].to(torch.int32)  # nonzero() is row-major: rows grouped, columns sorted
    vals = values[mask].to(torch.float32)
    return rows, cols, vals


def csr_row_indices(rows: torch.Tensor, nnz: int) -> torch.Tensor:
    """rows int32 [out+1] row pointer -> int64 [nnz]: the output row of each stored entry."""
    counts = (rows[1:] - rows[:-1]).to(torch.int64)
    row_ids = torch.arange(counts.numel(), device=rows.device)
    return torch.repeat_interleave(row_ids, counts, output_size=nnz)


def csr_to_dense(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape) -> torch.Tensor:
    """(rows int32 [out+1], cols int32 [nnz], vals float [nnz]) -> float32 ``shape`` = [out, in].

    Missing entries are 0; duplicate (row, col) entries add up, as in any CSR matrix.
    """
    dense = torch.zeros(tuple(shape), dtype=torch.float32, device=vals.device)
    if vals.numel():
        index = (csr_row_indices(rows, vals.numel()), cols.to(torch.int64))
        dense.index_put_(index, vals.to(torch.float32), accumulate=True)
    return dense
