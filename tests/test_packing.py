"""Bit packing of codes (issue item 5): round trip, size and the documented little-endian layout."""

from __future__ import annotations

import math

import pytest
import torch

from tq_deploy.ops import packed_size
from tq_deploy.reference.packing import pack_codes, unpack_codes

BITS = (1, 2, 3, 4, 5, 6, 7, 8)
DIMS = (1, 5, 7, 63, 64, 100, 128, 256)


def pack_one_vector_by_hand(codes: list[int], bits: int) -> list[int]:
    """The documented layout, one bit at a time: bit k of code i is stream bit i*bits + k,
    and stream bit n is bit (n % 8) of byte n // 8. Unused trailing bits stay 0."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, code in enumerate(codes):
        for k in range(bits):
            if (code >> k) & 1:
                n = i * bits + k
                out[n // 8] |= 1 << (n % 8)
    return out


def random_codes(shape, bits, gen) -> torch.Tensor:
    return torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", DIMS)
def test_round_trip_and_size(bits, dim, gen):
    codes = random_codes((3, 4, dim), bits, gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 4, math.ceil(dim * bits / 8)) == (3, 4, packed_size(dim, bits))
    assert torch.equal(unpack_codes(packed, bits, dim), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", (5, 13, 63, 64, 100))
def test_layout_bit_by_bit_against_independent_packer(bits, dim, gen):
    codes = random_codes((6, dim), bits, gen)
    packed = pack_codes(codes, bits)
    for row in range(codes.shape[0]):
        expected = pack_one_vector_by_hand(codes[row].tolist(), bits)
        assert packed[row].tolist() == expected, (bits, dim, row)
    # And the reverse: unpacking hand-packed bytes gives the codes back.
    hand = torch.tensor([pack_one_vector_by_hand(r.tolist(), bits) for r in codes], dtype=torch.uint8)
    assert torch.equal(unpack_codes(hand, bits, dim), codes)


def test_hand_computed_examples():
    # 3 bits, codes 0..7: code i occupies stream bits [3i, 3i+3).
    #   byte 0 = bits 0..7  : code0=000 (bits 0-2), code1=001 (bit 3 set), code2=010 (bit 7 set; its
    #                         high bit 8 spills into byte 1)            -> 0b1000_1000 = 0x88
    #   byte 1 = bits 8..15 : code2 bit 2 (0), code3=011 (bits 9, 10), code4=100 (bit 14),
    #                         code5=101 low bit (bit 15)                -> 0b1100_0110 = 0xC6
    #   byte 2 = bits 16..23: code5 bits 1,2 = 0,1 (bit 17), code6=110 (bits 19, 20),
    #                         code7=111 (bits 21, 22, 23)               -> 0b1111_1010 = 0xFA
    # Cross-check: sum_i i << 3i = 16434824 = 0xFAC688, little-endian bytes 88 C6 FA.
    codes = torch.arange(8, dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [0x88, 0xC6, 0xFA]
    # 2 bits, codes 0,1,2,3: 00 | 01<<2 | 10<<4 | 11<<6 = 0b11_10_01_00 = 0xE4.
    assert pack_codes(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2).tolist() == [0xE4]
    # 4 bits, codes 0xA, 0x5: first code in the low nibble -> 0x5A.
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    # 1 bit, 9 codes 1,0,0,0,0,0,0,1,1: bits 0 and 7 of byte 0, bit 0 of byte 1 (padding zero).
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x81, 0x01]
    # 3 bits, 3 codes 7,7,7: 9 bits set -> 0xFF then 0x01; the other 7 bits of byte 1 are zero padding.
    assert pack_codes(torch.tensor([7, 7, 7], dtype=torch.uint8), 3).tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", BITS)
def test_padding_bits_are_zero_and_max_codes_fill_bytes(bits):
    dim = 13  # 13, 26, 39, 52 bits: never a whole number of bytes, so the last byte is padded
    codes = torch.full((dim,), 2**bits - 1, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    used = dim * bits
    last = int(packed[-1])
    assert last == (1 << (used - 8 * (packed.numel() - 1))) - 1
    assert all(int(b) == 0xFF for b in packed[:-1])


def test_empty_and_leading_dims():
    codes = torch.zeros(0, 2, 64, dtype=torch.uint8)
    assert pack_codes(codes, 3).shape == (0, 2, 24)
    assert unpack_codes(torch.zeros(0, 24, dtype=torch.uint8), 3, 64).shape == (0, 64)


def test_rejects_codes_out_of_range_and_wrong_packed_size():
    with pytest.raises(ValueError, match=r"codes has value 4, expected values < 2\*\*bits = 4"):
        pack_codes(torch.tensor([0, 4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"packed.shape\[-1\]=5, expected ceil\(dim\*bits/8\) = 6 .*dim=16, bits=3"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 3, 16)
