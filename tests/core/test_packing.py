import pytest
import torch

from core.packing import CODECS, csr_to_dense, dense_to_csr, pack_codes, packed_rows, unpack_codes


def random_codes(out, inp, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8)


def as_uint32(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.tolist()]


def stream_reference(codes_of_column: list[int], bits: int) -> list[int]:
    """Independent oracle: each 32-code group as one Python integer bit stream, cut into words."""
    padded = codes_of_column + [0] * (-len(codes_of_column) % 32)
    words = []
    for g in range(0, len(padded), 32):
        stream = sum(c << (bits * k) for k, c in enumerate(padded[g:g + 32]))
        words += [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(bits)]
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("inp", [32, 576, 33, 1])
def test_round_trip_is_bit_exact_including_padding(bits, inp):
    codes = random_codes(24, inp, bits, seed=inp + bits)
    qweight = pack_codes(codes, bits)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (-(-inp // 32) * bits, 24) == (packed_rows(inp, bits), 24)
    assert torch.equal(unpack_codes(qweight, bits, inp), codes)
    assert unpack_codes(qweight, bits, inp).dtype == torch.uint8


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_packing_matches_an_independent_bit_stream_oracle(bits):
    codes = random_codes(5, 70, bits, seed=bits)
    qweight = pack_codes(codes, bits)
    for n in range(5):
        assert as_uint32(qweight[:, n]) == stream_reference(codes[n].tolist(), bits)


def test_three_bit_layout_by_hand():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, [0, 9, 10, 11, 20, 21, 22, 31]] = torch.tensor([7, 4, 0b101, 1, 7, 0b011, 6, 7], dtype=torch.uint8)
    # word0: code0=7 at bits 0-2; code9=4 at bits 27-29; low two bits of code10 (01) at bits 30-31.
    word0 = 7 | 4 << 27 | 0b01 << 30
    # word1: bit 2 of code10 (1) at bit 0; code11=1 at bits 1-3; code20=7 at bits 28-30;
    #        low bit of code21 (1) at bit 31 -> top bit set, negative as int32.
    word1 = 1 | 1 << 1 | 7 << 28 | 1 << 31
    # word2: bits 1-2 of code21 (01) at bits 0-1; code22=6 at bits 2-4; code31=7 at bits 29-31.
    word2 = 0b01 | 6 << 2 | 7 << 29
    qweight = pack_codes(codes, 3)
    assert as_uint32(qweight[:, 0]) == [word0, word1, word2]
    assert qweight[:, 0].tolist() == [word0, word1 - (1 << 32), word2 - (1 << 32)]
    assert qweight[1, 0] < 0 and qweight[2, 0] < 0
    assert torch.equal(unpack_codes(qweight, 3, 32), codes)


def test_four_bit_layout_by_hand():
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    codes[0] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    codes[1, 0], codes[1, 7] = 15, 15
    qweight = pack_codes(codes, 4)
    assert qweight.shape == (4, 2)  # 8 inputs padded to 32: 4 words per column
    assert as_uint32(qweight[0]) == [0x87654321, 0xF000000F]
    assert qweight[0].tolist() == [0x87654321 - (1 << 32), 0xF000000F - (1 << 32)]
    assert qweight[1:].eq(0).all()  # padding is code 0


def test_two_bit_layout_by_hand():
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, [0, 2, 3, 15]] = torch.tensor([3, 1, 2, 2], dtype=torch.uint8)
    assert as_uint32(pack_codes(codes, 2)[0]) == [3 | 1 << 4 | 2 << 6 | 2 << 30]


def test_bad_input_is_refused():
    for bits in (1, 7, 9):
        with pytest.raises(ValueError, match="supported widths"):
            pack_codes(random_codes(2, 32, 3), bits)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.full((2, 32), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expected int32 with 3 rows"):
        unpack_codes(torch.zeros(4, 2, dtype=torch.int32), 3, 32)


def test_eight_bit_layout_is_one_byte_per_code():
    codes = torch.arange(32, dtype=torch.uint8).mul(7).view(1, 32)
    words = as_uint32(pack_codes(codes, 8)[:, 0])
    assert words == [int.from_bytes(bytes(codes[0, 4 * w:4 * w + 4].tolist()), "little") for w in range(8)]


def test_registry_holds_the_projection_and_embedding_widths():
    assert sorted(CODECS) == [2, 3, 4, 5, 6, 8]  # 2-6: projections; 4, 5, 6, 8: embedding and head


def test_csr_round_trip():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(7, 45, generator=g)
    mask = torch.rand(7, 45, generator=g) < 0.1
    mask[3] = False  # an empty row
    mask[0, 5] = True
    values[0, 5] = 0.0  # a selected zero stays an entry
    rows, cols, vals = dense_to_csr(values, mask)
    assert (rows.dtype, cols.dtype, vals.dtype) == (torch.int32, torch.int32, torch.float32)
    assert rows.shape == (8,) and rows[0] == 0 and rows[-1] == mask.sum() == vals.numel()
    assert rows[4] == rows[3]
    for r in range(7):  # columns sorted within each row
        row_cols = cols[rows[r]:rows[r + 1]]
        assert torch.equal(row_cols, torch.nonzero(mask[r]).flatten().int())
    assert torch.equal(csr_to_dense(rows, cols, vals, (7, 45)), torch.where(mask, values, 0.0))


def test_empty_csr():
    rows, cols, vals = dense_to_csr(torch.randn(4, 9), torch.zeros(4, 9, dtype=torch.bool))
    assert rows.tolist() == [0] * 5 and cols.numel() == 0 and vals.numel() == 0
    assert torch.equal(csr_to_dense(rows, cols, vals, (4, 9)), torch.zeros(4, 9))
