"""TQEncode and TQCacheUpdate on Triton: norm + rotation + quantize + pack in one pass.

Per tile of BLOCK_R rows:
    norm = ||x||_2 (fp32);  y = (x @ Pi^T) / norm  (0 where norm == 0)
    code = #{k : boundary_k < y}  (binary search over the sorted midpoints: selects among
                                   scalar boundaries for the first 4 levels, gathers below)
The product runs on the tensor cores in the input's half type against Pi^T
split into parts (see _common.rotation_parts), which reproduces fp32. A cache
update is the same kernel writing row r to the packed row of its slot; a cache
with float16 norms stores each norm rounded to nearest even, its codes chosen
with the float32 norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tq_deploy.device_constants import boundaries
from tq_deploy.ops import packed_size
from tq_deploy.reference.checks import CacheUpdateArgs, EncodeArgs

from . import _common as C
from ._bits import store_codes
from ._dot import half_dot, interpreting


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
def _top16(y, bnd_ptr, S: tl.constexpr):
    """Which of 16 equal runs of S codes y falls in: a 4-level search among the 15 boundaries
    that end the runs (boundary (k+1)*S - 1 ends run k), thresholds picked with selects among
    scalar loads (no per-element gathers). With S = 1 this is the whole 4-bit quantizer."""
    c3 = y > tl.load(bnd_ptr + (8 * S - 1))
    c2 = y > tl.where(c3, tl.load(bnd_ptr + (12 * S - 1)), tl.load(bnd_ptr + (4 * S - 1)))
    t1 = tl.where(c3, tl.where(c2, tl.load(bnd_ptr + (14 * S - 1)), tl.load(bnd_ptr + (10 * S - 1))),
                  tl.where(c2, tl.load(bnd_ptr + (6 * S - 1)), tl.load(bnd_ptr + (2 * S - 1))))
    c1 = y > t1
    t0 = tl.where(c3,
                  tl.where(c2, tl.where(c1, tl.load(bnd_ptr + (15 * S - 1)), tl.load(bnd_ptr + (13 * S - 1))),
                           tl.where(c1, tl.load(bnd_ptr + (11 * S - 1)), tl.load(bnd_ptr + (9 * S - 1)))),
                  tl.where(c2, tl.where(c1, tl.load(bnd_ptr + (7 * S - 1)), tl.load(bnd_ptr + (5 * S - 1))),
                           tl.where(c1, tl.load(bnd_ptr + (3 * S - 1)), tl.load(bnd_ptr + (S - 1)))))
    c0 = y > t0
    return c3.to(tl.int32) * 8 + c2.to(tl.int32) * 4 + c1.to(tl.int32) * 2 + c0.to(tl.int32)


@triton.jit
def _quantize(y, bnd_ptr, BITS: tl.constexpr):
    """Number of boundaries strictly below y (a tie takes the lower code): a branch-free binary
    search. Up to 4 bits its thresholds are picked with selects among scalar boundaries (no
    per-element memory gathers); from 5 bits the first 4 levels still are, and each further
    level gathers one boundary per element (the table is at most 1 KB and stays in L1)."""
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
    elif BITS == 4:
        code = _top16(y, bnd_ptr, 1)
    else:
        # y lies in the run of 2**(BITS-4) codes starting at `code`, whose inner boundaries
        # are code .. code + run - 2: each level halves the run
        code = _top16(y, bnd_ptr, 1 << (BITS - 4)) << (BITS - 4)
        for lvl in tl.static_range(BITS - 4):  # (a constexpr may not be reassigned in the loop: inlined)
            code += tl.where(y > tl.load(bnd_ptr + code + ((1 << (BITS - 5 - lvl)) - 1)), 1 << (BITS - 5 - lvl), 0)
    return code


@triton.jit
def _pow2(e):
    """2.0^e for integer e in [-126, 127], built from its exponent bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def encode_kernel(x_ptr, rot0_ptr, rot1_ptr, rot2_ptr, bnd_ptr, words_ptr, bytes_ptr, norms_ptr, slot_ptr,
                  n_rows, x_row_stride, heads, n_slots,
                  D: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BJ: tl.constexpr,
                  NPARTS: tl.constexpr, PART_SCALE: tl.constexpr, FP32: tl.constexpr, USE_SLOTS: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Encode rows of x [n_rows, D]; with USE_SLOTS, row r = token r // heads, head r % heads
    goes to packed row slot[token] * heads + head; a slot outside [0, n_slots) skips its token
    (the rule of the CUDA launcher: checking the slots on the host would cost a device sync)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * x_row_stride + tl.arange(0, D)[None, :], mask=rmask[:, None], other=0.0)
    xf = x.to(tl.float32)
    # the norm of x * 2^k with max|x * 2^k| in [1, 2), scaled back by 2^-k (exact, as the
    # reference): squares of fp32 inputs beyond 1e19 overflow and below 1e-19 underflow
    biased = (tl.max(tl.abs(xf), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.where(biased == 0, 126, 127 - biased)
    k1 = k // 2
    k2 = k - k1  # two factors: 2^k alone is out of range for the largest and smallest x
    unit = xf * (_pow2(k1) * _pow2(k2))[:, None]
    norm = tl.sqrt(tl.sum(unit * unit, axis=1)) * _pow2(-k1) * _pow2(-k2)
    denom = tl.where(norm > 0, norm, 1.0)
    if USE_SLOTS:
        slot = tl.load(slot_ptr + rows64 // heads, mask=rmask, other=-1)
        omask = rmask & (slot >= 0) & (slot < n_slots)
        orow = tl.where(omask, slot * heads + rows64 % heads, 0)
    else:
        omask = rmask
        orow = rows64
    # A float16 cache keeps the norm rounded to nearest even; the codes below divide by the float32 norm.
    tl.store(norms_ptr + orow, norm.to(norms_ptr.dtype.element_ty), mask=omask)
    for jc in tl.static_range(D // BJ):
        acc = _rotate_chunk(x, rot0_ptr, rot1_ptr, rot2_ptr, jc * BJ, D, BJ, NPARTS, PART_SCALE, FP32, UPCAST)
        y = acc / denom[:, None]
        code = _quantize(y, bnd_ptr, BITS)
        store_codes(words_ptr, bytes_ptr, code, orow, omask, jc * BJ, BLOCK_R, BJ, D, BITS)


_BLOCK_R = 64


def _launch(x2, rotation, codebook, bits, codes, norms, slot_mapping=None, heads=1):
    """x2 [R, D] (rows contiguous) -> codes rows / norms, optionally through slots."""
    n_rows, dim = x2.shape
    if n_rows == 0:
        return
    parts = C.rotation_parts(rotation, x2.dtype, x2.device)
    padded = parts + (parts[0],) * (3 - len(parts))
    block_r = _BLOCK_R if dim <= 128 else 32
    encode_kernel[(C.cdiv(n_rows, block_r),)](
        x2, *padded, boundaries(codebook, x2.device), C.as_words(codes), codes, norms,
        slot_mapping if slot_mapping is not None else norms,
        n_rows, x2.stride(0), heads, norms.numel() // heads,
        D=dim, BITS=bits, BLOCK_R=block_r, BJ=min(dim, 64), NPARTS=len(parts),
        PART_SCALE=C.PART_SCALE.get(x2.dtype, 1.0), FP32=x2.dtype == torch.float32,
        USE_SLOTS=slot_mapping is not None, UPCAST=interpreting() and x2.dtype == torch.bfloat16, num_warps=4,
    )


def supports_encode(a: EncodeArgs) -> bool:
    return C.runs_here(a.device) and a.head_dim in C.SUPPORTED_DIMS and a.bits in C.SUPPORTED_BITS


def encode(a: EncodeArgs):
    """(codes [..., P] uint8, norms [...] fp32) of x [..., D]; see the reference encode."""
    lead = a.x.shape[:-1]
    x2 = a.x.reshape(-1, a.head_dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    p = packed_size(a.head_dim, a.bits)
    codes = torch.empty((x2.shape[0], p), dtype=torch.uint8, device=a.device)
    norms = torch.empty((x2.shape[0],), dtype=torch.float32, device=a.device)
    _launch(x2, a.rotation, a.codebook, a.bits, codes, norms)
    return codes.reshape(*lead, p), norms.reshape(lead)


def _word_aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.storage_offset() % 4 == 0


def supports_cache_update(a: CacheUpdateArgs) -> bool:
    """Contiguous caches whose packed rows can be written as int32 words (in place: no copy)."""
    return (C.runs_here(a.device) and a.head_dim in C.SUPPORTED_DIMS and a.k_bits in C.SUPPORTED_BITS
            and a.v_bits in C.SUPPORTED_BITS and _word_aligned(a.k_codes) and _word_aligned(a.v_codes)
            and a.k_norms.is_contiguous() and a.v_norms.is_contiguous())


def cache_update(a: CacheUpdateArgs):
    """Encode key/value [T, Hkv, D] into their paged slots, in place; a slot < 0 or >= N * B skips
    the token and a slot named twice keeps its last token (earlier ones are dropped here, on the device)."""
    from tq_deploy.reference.paged import last_writer

    t, heads, dim = a.num_tokens, a.num_kv_heads, a.head_dim
    slots = a.slot_mapping.to(torch.int64)
    if t > 1:
        slots = torch.where(last_writer(slots), slots, -1)
    slots = slots.contiguous()
    for src, codes, norms, cb, bits in ((a.key, a.k_codes, a.k_norms, a.k_codebook, a.k_bits),
                                         (a.value, a.v_codes, a.v_norms, a.v_codebook, a.v_bits)):
        x2 = src.reshape(t * heads, dim)
        if x2.stride(-1) != 1 or (t * heads > 1 and x2.stride(0) != dim):
            x2 = x2.contiguous()
        _launch(x2, a.rotation, cb, bits, codes, norms, slot_mapping=slots, heads=heads)
    return a.k_codes, a.k_norms, a.v_codes, a.v_norms
