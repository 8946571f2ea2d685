"""Triton kernels for Encode (norm + rotation + quantize + pack, one pass) and Decode.

Encode, per tile of BLOCK_R rows:
    norm = ||x||_2 (fp32);  y = (x @ Pi^T) / norm  (0 where norm == 0)
    code = #{k : boundary_k < y}  (select-based binary search over the sorted midpoints)
The product runs on the tensor cores in the input's half type against Pi^T
split into parts (see _common.rotation_parts), which reproduces fp32.

Decode: x_hat = norm * (c[code] @ Pi), fp32 product.
"""

import triton
import triton.language as tl

from ._bits import store_codes, unpack_codes_masked
from ._dot import half_dot


@triton.jit
def _rotate_chunk(x, rot0_ptr, rot1_ptr, rot2_ptr, j0, D: tl.constexpr, BJ: tl.constexpr,
                  NPARTS: tl.constexpr, PART_SCALE: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr):
    """x [R, D] @ Pi^T[:, j0:j0+BJ] in fp32 (smallest part first)."""
    rp = tl.arange(0, D)[:, None] * D + (j0 + tl.arange(0, BJ))[None, :]
    if FP32:
        acc = tl.dot(x, tl.load(rot0_ptr + rp), input_precision="ieee")
    else:
        zero = tl.zeros([x.shape[0], BJ], tl.float32)
        if NPARTS == 3:
            acc = half_dot(x, tl.load(rot2_ptr + rp), zero, UPCAST) * (1.0 / (PART_SCALE * PART_SCALE))
            acc = half_dot(x, tl.load(rot1_ptr + rp), zero, UPCAST) * (1.0 / PART_SCALE) + acc
        else:
            acc = half_dot(x, tl.load(rot1_ptr + rp), zero, UPCAST) * (1.0 / PART_SCALE)
        acc = half_dot(x, tl.load(rot0_ptr + rp), acc, UPCAST)
    return acc


@triton.jit
def _quantize(y, bnd_ptr, BITS: tl.constexpr):
    """Number of boundaries strictly below y: a branch-free binary search whose thresholds
    are picked with selects among scalar boundaries (no per-element memory gathers)."""
    if BITS == 1:
        code = (y > tl.load(bnd_ptr)).to(tl.int32)
    elif BITS == 2:
        c1 = y > tl.load(bnd_ptr + 1)
        c0 = y > tl.where(c1, tl.load(bnd_ptr + 2), tl.load(bnd_ptr + 0))
        code = c1.to(tl.int32) * 2 + c0.to(tl.int32)
    elif BITS == 3:
        c2 = y > tl.load(bnd_ptr + 3)
        c1 = y > tl.where(c2, tl.load(bnd_ptr + 5), tl.load(bnd_ptr + 1))
        t0 = tl.where(c2, tl.where(c1, tl.load(bnd_ptr + 6), tl.load(bnd_ptr + 4)),
                      tl.where(c1, tl.load(bnd_ptr + 2), tl.load(bnd_ptr + 0)))
        c0 = y > t0
        code = c2.to(tl.int32) * 4 + c1.to(tl.int32) * 2 + c0.to(tl.int32)
    else:
        c3 = y > tl.load(bnd_ptr + 7)
        c2 = y > tl.where(c3, tl.load(bnd_ptr + 11), tl.load(bnd_ptr + 3))
        t1 = tl.where(c3, tl.where(c2, tl.load(bnd_ptr + 13), tl.load(bnd_ptr + 9)),
                      tl.where(c2, tl.load(bnd_ptr + 5), tl.load(bnd_ptr + 1)))
        c1 = y > t1
        t0 = tl.where(c3,
                      tl.where(c2, tl.where(c1, tl.load(bnd_ptr + 14), tl.load(bnd_ptr + 12)),
                               tl.where(c1, tl.load(bnd_ptr + 10), tl.load(bnd_ptr + 8))),
                      tl.where(c2, tl.where(c1, tl.load(bnd_ptr + 6), tl.load(bnd_ptr + 4)),
                               tl.where(c1, tl.load(bnd_ptr + 2), tl.load(bnd_ptr + 0))))
        c0 = y > t0
        code = c3.to(tl.int32) * 8 + c2.to(tl.int32) * 4 + c1.to(tl.int32) * 2 + c0.to(tl.int32)
    return code


@triton.jit
def encode_kernel(x_ptr, rot0_ptr, rot1_ptr, rot2_ptr, bnd_ptr, words_ptr, bytes_ptr, norms_ptr, slot_ptr,
                  n_rows, x_row_stride, heads,
                  D: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BJ: tl.constexpr,
                  NPARTS: tl.constexpr, PART_SCALE: tl.constexpr, FP32: tl.constexpr, USE_SLOTS: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Encode rows of x [n_rows, D]; with USE_SLOTS, row r = token r // heads, head r % heads
    goes to packed row slot[token] * heads + head (slot < 0: skipped)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * x_row_stride + tl.arange(0, D)[None, :], mask=rmask[:, None], other=0.0)
    xf = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(xf * xf, axis=1))
    denom = tl.where(norm > 0, norm, 1.0)
    if USE_SLOTS:
        slot = tl.load(slot_ptr + rows64 // heads, mask=rmask, other=-1)
        omask = rmask & (slot >= 0)
        orow = tl.where(omask, slot * heads + rows64 % heads, 0)
    else:
        omask = rmask
        orow = rows64
    tl.store(norms_ptr + orow, norm, mask=omask)
    for jc in tl.static_range(D // BJ):
        acc = _rotate_chunk(x, rot0_ptr, rot1_ptr, rot2_ptr, jc * BJ, D, BJ, NPARTS, PART_SCALE, FP32, UPCAST)
        y = acc / denom[:, None]
        code = _quantize(y, bnd_ptr, BITS)
        store_codes(words_ptr, bytes_ptr, code, orow, omask, jc * BJ, BLOCK_R, BJ, D, BITS)


@triton.jit
def decode_kernel(words_ptr, bytes_ptr, norms_ptr, cb_ptr, rot_ptr, out_ptr, n_rows,
                  D: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BJ: tl.constexpr):
    """out[r] = norm[r] * (c[code[r]] @ Pi), Pi [D, D] fp32 row-major."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    codes = unpack_codes_masked(words_ptr, bytes_ptr, rows64, rmask, BLOCK_R, D, BITS)
    vals = tl.load(cb_ptr + codes)
    norm = tl.load(norms_ptr + rows64, mask=rmask, other=0.0)
    for jc in tl.static_range(D // BJ):
        cols = jc * BJ + tl.arange(0, BJ)
        rot = tl.load(rot_ptr + tl.arange(0, D)[:, None] * D + cols[None, :])
        acc = tl.dot(vals, rot, input_precision="ieee") * norm[:, None]
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
