"""Triton helpers that pack and unpack little-endian code streams.

Bit widths 1, 2 and 4 divide 32, so a vector's packed bytes are read and
written as int32 words holding 32/bits codes each (code k of a word sits at bit
k*bits). Three-bit codes come in groups of 8 codes in 3 bytes (24 bits); a
group is assembled from its three bytes.
"""

import triton
import triton.language as tl


@triton.jit
def unpack_codes(words_ptr, bytes_ptr, row, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Codes [ROWS, D] (int32) of the packed vectors at rows ``row`` [ROWS] (int64).

    ``words_ptr`` is the int32 view and ``bytes_ptr`` the uint8 view of the same
    packed tensor whose rows hold D*BITS/8 bytes. Rows must be valid (callers
    clamp invalid rows to a readable one instead of masking, so the word loads
    stay unmasked 16-byte loads).
    """
    if BITS == 3:
        p: tl.constexpr = D * 3 // 8
        grp = row[:, None] * p + tl.arange(0, D // 8)[None, :] * 3
        b0 = tl.load(bytes_ptr + grp).to(tl.int32)
        b1 = tl.load(bytes_ptr + grp + 1).to(tl.int32)
        b2 = tl.load(bytes_ptr + grp + 2).to(tl.int32)
        g24 = b0 | (b1 << 8) | (b2 << 16)
        shifts = tl.arange(0, 8) * 3
        codes = (g24[:, :, None] >> shifts[None, None, :]) & 7
    else:
        cpw: tl.constexpr = 32 // BITS
        nw: tl.constexpr = D // cpw
        w = tl.load(words_ptr + row[:, None] * nw + tl.arange(0, nw)[None, :])
        shifts = tl.arange(0, cpw) * BITS
        codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, [ROWS, D])


@triton.jit
def unpack_codes_masked(words_ptr, bytes_ptr, row, mask, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Like unpack_codes, rows where ``mask`` is false read as code 0."""
    if BITS == 3:
        p: tl.constexpr = D * 3 // 8
        grp = row[:, None] * p + tl.arange(0, D // 8)[None, :] * 3
        m = mask[:, None]
        b0 = tl.load(bytes_ptr + grp, mask=m, other=0).to(tl.int32)
        b1 = tl.load(bytes_ptr + grp + 1, mask=m, other=0).to(tl.int32)
        b2 = tl.load(bytes_ptr + grp + 2, mask=m, other=0).to(tl.int32)
        g24 = b0 | (b1 << 8) | (b2 << 16)
        shifts = tl.arange(0, 8) * 3
        codes = (g24[:, :, None] >> shifts[None, None, :]) & 7
    else:
        cpw: tl.constexpr = 32 // BITS
        nw: tl.constexpr = D // cpw
        w = tl.load(words_ptr + row[:, None] * nw + tl.arange(0, nw)[None, :], mask=mask[:, None], other=0)
        shifts = tl.arange(0, cpw) * BITS
        codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, [ROWS, D])


@triton.jit
def store_codes(words_ptr, bytes_ptr, codes, row, mask, j0, ROWS: tl.constexpr, BJ: tl.constexpr,
                D: tl.constexpr, BITS: tl.constexpr):
    """Pack codes [ROWS, BJ] (int32, columns j0..j0+BJ of each vector) into rows ``row``."""
    if BITS == 3:
        p: tl.constexpr = D * 3 // 8
        g = tl.reshape(codes, [ROWS, BJ // 8, 8])
        shifts = tl.arange(0, 8) * 3
        g24 = tl.sum(g << shifts[None, None, :], axis=2)
        off = row[:, None] * p + (j0 // 8 + tl.arange(0, BJ // 8))[None, :] * 3
        m = mask[:, None]
        tl.store(bytes_ptr + off, (g24 & 255).to(tl.uint8), mask=m)
        tl.store(bytes_ptr + off + 1, ((g24 >> 8) & 255).to(tl.uint8), mask=m)
        tl.store(bytes_ptr + off + 2, ((g24 >> 16) & 255).to(tl.uint8), mask=m)
    else:
        cpw: tl.constexpr = 32 // BITS
        nw: tl.constexpr = D // cpw
        g = tl.reshape(codes.to(tl.uint32), [ROWS, BJ // cpw, cpw])
        shifts = (tl.arange(0, cpw) * BITS).to(tl.uint32)
        w = tl.sum(g << shifts[None, None, :], axis=2)
        off = row[:, None] * nw + (j0 // cpw + tl.arange(0, BJ // cpw))[None, :]
        tl.store(words_ptr + off, w.to(tl.int32, bitcast=True), mask=mask[:, None])
