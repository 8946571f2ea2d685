"""Triton helpers that pack and unpack little-endian code streams (docs/ops.md, "Packed byte layout").

The bit width picks one of three layouts at compile time:

    words    1, 2, 4, 8 bits divide 32: a vector's packed bytes are read and written as int32
             words of 32/bits codes (code k of a word at bit k*bits); 8-bit codes are its bytes.
    triples  3 and 6 bits: every 3 bytes (24 bits) hold 8 or 4 whole codes; a triple is
             assembled from its three bytes into one int32.
    octets   5 and 7 bits: 8 codes fill ``bits`` bytes (40 or 56 bits, more than an int32).
             Every code of such a group lies whole inside the group's first four bytes ("lo")
             or inside its last four ("hi"), two overlapping int32 windows, so each code is one
             32-bit shift of one window: no 64-bit arithmetic in the inner loops.

Every packed row starts on a 4-byte boundary for the head dims the kernels take (multiples
of 32 coordinates hold a multiple of 4 bytes at any width).
"""

import triton
import triton.language as tl


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    """ptr [ROWS, n]; with MASKED, rows where ``mask`` [ROWS] is false read 0."""
    if MASKED:
        v = tl.load(ptr, mask=mask[:, None], other=0)
    else:
        v = tl.load(ptr)
    return v


@triton.jit
def _octet_windows(bytes_ptr, grp, mask, MASKED: tl.constexpr, BITS: tl.constexpr):
    """(lo, hi) int32 windows of the 8-code groups of ``BITS`` bytes starting at byte offsets ``grp``."""
    lo = tl.zeros(grp.shape, tl.int32)
    hi = tl.zeros(grp.shape, tl.int32)
    for j in tl.static_range(BITS):
        b = _load(bytes_ptr + grp + j, mask, MASKED).to(tl.int32)
        if j < 4:
            lo = lo | (b << (8 * j))
        if j >= BITS - 4:
            hi = hi | (b << (8 * (j - (BITS - 4))))
    return lo, hi


@triton.jit
def _octet_shifts(BITS: tl.constexpr):
    """Per code k of a group: whether it sits in the lo window, and its shift in lo and in hi."""
    start = tl.arange(0, 8) * BITS
    in_lo = start + BITS <= 32
    lo_shift = tl.where(in_lo, start, 0)
    hi_shift = tl.where(in_lo, 0, start - 8 * (BITS - 4))  # hi begins at bit 8 * (BITS - 4)
    return in_lo, lo_shift, hi_shift


@triton.jit
def _octet_codes(bytes_ptr, row, mask, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                 MASKED: tl.constexpr):
    p: tl.constexpr = D * BITS // 8
    grp = row[:, None] * p + tl.arange(0, D // 8)[None, :] * BITS
    lo, hi = _octet_windows(bytes_ptr, grp, mask, MASKED, BITS)
    in_lo, lo_shift, hi_shift = _octet_shifts(BITS)
    codes = tl.where(in_lo[None, None, :], lo[:, :, None] >> lo_shift[None, None, :],
                     hi[:, :, None] >> hi_shift[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, [ROWS, D])


# The word and triple paths are written out in both unpack functions rather than shared through
# a helper: routing them through one more inlined call (which adds scope labels to the PTX)
# changed ptxas's register allocation of the 1-4 bit attention kernel; written out, the 1-4 bit
# paths compile to the same sm_90 SASS as before 5-8 bits existed.


@triton.jit
def unpack_codes(words_ptr, bytes_ptr, row, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Codes [ROWS, D] (int32) of the packed vectors at rows ``row`` [ROWS] (int64).

    ``words_ptr`` is the int32 view and ``bytes_ptr`` the uint8 view of the same
    packed tensor whose rows hold D*BITS/8 bytes. Rows must be valid (callers
    clamp invalid rows to a readable one instead of masking, so the word loads
    stay unmasked 16-byte loads).
    """
    if BITS == 3 or BITS == 6:
        gc: tl.constexpr = 24 // BITS
        p: tl.constexpr = D * BITS // 8
        grp = row[:, None] * p + tl.arange(0, D // gc)[None, :] * 3
        b0 = tl.load(bytes_ptr + grp).to(tl.int32)
        b1 = tl.load(bytes_ptr + grp + 1).to(tl.int32)
        b2 = tl.load(bytes_ptr + grp + 2).to(tl.int32)
        g24 = b0 | (b1 << 8) | (b2 << 16)
        shifts = tl.arange(0, gc) * BITS
        codes = tl.reshape((g24[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), [ROWS, D])
    elif BITS == 5 or BITS == 7:
        codes = _octet_codes(bytes_ptr, row, row, ROWS, D, BITS, False)
    else:
        cpw: tl.constexpr = 32 // BITS
        nw: tl.constexpr = D // cpw
        w = tl.load(words_ptr + row[:, None] * nw + tl.arange(0, nw)[None, :])
        shifts = tl.arange(0, cpw) * BITS
        codes = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), [ROWS, D])
    return codes


@triton.jit
def unpack_codes_masked(words_ptr, bytes_ptr, row, mask, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Like unpack_codes, rows where ``mask`` is false read as code 0."""
    if BITS == 3 or BITS == 6:
        gc: tl.constexpr = 24 // BITS
        p: tl.constexpr = D * BITS // 8
        grp = row[:, None] * p + tl.arange(0, D // gc)[None, :] * 3
        m = mask[:, None]
        b0 = tl.load(bytes_ptr + grp, mask=m, other=0).to(tl.int32)
        b1 = tl.load(bytes_ptr + grp + 1, mask=m, other=0).to(tl.int32)
        b2 = tl.load(bytes_ptr + grp + 2, mask=m, other=0).to(tl.int32)
        g24 = b0 | (b1 << 8) | (b2 << 16)
        shifts = tl.arange(0, gc) * BITS
        codes = tl.reshape((g24[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), [ROWS, D])
    elif BITS == 5 or BITS == 7:
        codes = _octet_codes(bytes_ptr, row, mask, ROWS, D, BITS, True)
    else:
        cpw: tl.constexpr = 32 // BITS
        nw: tl.constexpr = D // cpw
        w = tl.load(words_ptr + row[:, None] * nw + tl.arange(0, nw)[None, :], mask=mask[:, None], other=0)
        shifts = tl.arange(0, cpw) * BITS
        codes = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), [ROWS, D])
    return codes


@triton.jit
def store_codes(words_ptr, bytes_ptr, codes, row, mask, j0, ROWS: tl.constexpr, BJ: tl.constexpr,
                D: tl.constexpr, BITS: tl.constexpr):
    """Pack codes [ROWS, BJ] (int32, columns j0..j0+BJ of each vector) into rows ``row``."""
    m = mask[:, None]
    if BITS == 3 or BITS == 6:
        gc: tl.constexpr = 24 // BITS
        p: tl.constexpr = D * BITS // 8
        g = tl.reshape(codes, [ROWS, BJ // gc, gc])
        shifts = tl.arange(0, gc) * BITS
        g24 = tl.sum(g << shifts[None, None, :], axis=2)
        off = row[:, None] * p + (j0 // gc + tl.arange(0, BJ // gc))[None, :] * 3
        tl.store(bytes_ptr + off, (g24 & 255).to(tl.uint8), mask=m)
        tl.store(bytes_ptr + off + 1, ((g24 >> 8) & 255).to(tl.uint8), mask=m)
        tl.store(bytes_ptr + off + 2, ((g24 >> 16) & 255).to(tl.uint8), mask=m)
    elif BITS == 5 or BITS == 7:
        p: tl.constexpr = D * BITS // 8
        g = tl.reshape(codes.to(tl.uint32), [ROWS, BJ // 8, 8])
        in_lo, lo_shift, hi_shift = _octet_shifts(BITS)
        sel = in_lo[None, None, :]
        # the two windows hold disjoint codes, so a byte they share is the OR of both
        lo = tl.sum(tl.where(sel, g << lo_shift.to(tl.uint32)[None, None, :], 0), axis=2)
        hi = tl.sum(tl.where(sel, 0, g << hi_shift.to(tl.uint32)[None, None, :]), axis=2)
        off = row[:, None] * p + (j0 // 8 + tl.arange(0, BJ // 8))[None, :] * BITS
        for j in tl.static_range(BITS):
            if j < 4:
                if j >= BITS - 4:
                    b = (lo >> (8 * j)) | (hi >> (8 * (j - (BITS - 4))))
                else:
                    b = lo >> (8 * j)
            else:
                b = hi >> (8 * (j - (BITS - 4)))
            tl.store(bytes_ptr + off + j, (b & 255).to(tl.uint8), mask=m)
    else:
        cpw: tl.constexpr = 32 // BITS
        nw: tl.constexpr = D // cpw
        g = tl.reshape(codes.to(tl.uint32), [ROWS, BJ // cpw, cpw])
        shifts = (tl.arange(0, cpw) * BITS).to(tl.uint32)
        w = tl.sum(g << shifts[None, None, :], axis=2)
        off = row[:, None] * nw + (j0 // cpw + tl.arange(0, BJ // cpw))[None, :]
        tl.store(words_ptr + off, w.to(tl.int32, bitcast=True), mask=m)
