"""TQPagedPrefill on Triton: causal flash attention over the paged cache, in the rotated domain.

Three steps:
  q_rot           (q @ Pi^T) * scale * log2(e) for all T * Hq rows: one float32 matrix product (cuBLAS; a
                  Triton row kernel as in the decode path took most of a prefill's time at T * Hq rows),
                  stored in the half type
  prefill_kernel  one program per (query tile, KV head). A tile is BLOCK_M consecutive query rows of
                  one sequence times the G query heads of the KV head (the GQA group shares every K/V
                  tile), laid out as BLOCK_M * GP rows (GP = G padded to a power of two). It walks
                  the sequence's cache BLOCK_N tokens at a time up to the tile's last position: codes
                  read packed and dequantized to half-type centroids in registers, scores = q_rot .
                  c_k^T on the tensor cores times ||k||, the causal mask per row, online softmax in
                  base 2, then P * ||v|| . c_v. Writes acc / l in float32.
  rotate-back     out = (acc / l) @ Pi, one float32 matrix product again. (Rotating in the attention kernel
                  held a [rows, D] fp32 dot operand beside the loop's tiles and spilled on sm_90.)

Which tile a program takes: tiles are numbered sequence after sequence (ceil(n_s / BLOCK_M) each);
``tile_ends`` (their running count per sequence, computed on the device) is binary-searched, so the
grid needs only the upper bound ceil(T / BLOCK_M) + S and the host never reads query_start.

With key_mean and rope_inv_freq (HAS_MEAN) the scores of positions t >= 1 gain q . R_t mu as in the
decode kernel (paged_attention.mean_scores: cos / sin per K/V tile, from the unrotated query rows).

A row's later tokens are masked out of its value sum through the weights (P * ||v|| is set to 0
there; centroids are finite), so a NaN norm in a chunk's own future never reaches an earlier row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tq_deploy.device_constants import codebook_as, float_matrix
from tq_deploy.reference.checks import PagedPrefillArgs

from . import _common as C
from ._bits import unpack_codes
from ._dot import half_dot, interpreting
from .paged_attention import (LOG2E, MAX_GROUP, MEAN_CHUNK, _next_pow2, _word_aligned, cache_rows, mean_inputs,
                              mean_scores)


@triton.jit
def _find_tile(ends_ptr, num_seqs, pid, steps):
    """(sequence, its tile index) of global tile ``pid``: the first s with tile_ends[s] > pid
    (``steps`` >= bit length of num_seqs halvings settle it)."""
    lo = num_seqs * 0
    hi = num_seqs + 0
    for _ in range(steps):
        mid = (lo + hi) // 2
        end = tl.load(ends_ptr + tl.minimum(mid, num_seqs - 1))
        right = (lo < hi) & (end <= pid)
        left = (lo < hi) & (end > pid)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(left, mid, hi)
    before = tl.load(ends_ptr + tl.maximum(lo - 1, 0), mask=lo > 0, other=0)
    return lo, pid - before


@triton.jit
def prefill_kernel(qrot_ptr, kw_ptr, kb_ptr, kn_ptr, vw_ptr, vb_ptr, vn_ptr, bt_ptr, ctx_ptr, qs_ptr, ends_ptr,
                   kcb_ptr, vcb_ptr, o_ptr, q_ptr, mu_ptr, w_ptr,
                   bt_stride, num_seqs, num_tokens, num_q_heads, num_kv_heads, num_blocks, max_blocks, steps,
                   mean_factor,
                   G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                   HAS_MEAN: tl.constexpr, MEAN_JC: tl.constexpr, INTERPRET: tl.constexpr):
    """One (query tile, KV head). Device data the host never checked is made safe here: query_start
    is clamped to [0, T] and made non-decreasing per sequence, a context length to [0, M * B],
    positions below 0 see no token (zeros), and tokens whose block-table entry is outside [0, N)
    are skipped, so nothing is read or written out of bounds."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    s, tile = _find_tile(ends_ptr, num_seqs, pid, steps)
    if s < num_seqs:
        first = tl.minimum(tl.maximum(tl.load(qs_ptr + s), 0), num_tokens)
        last = tl.minimum(tl.maximum(tl.load(qs_ptr + s + 1), first), num_tokens)
        n = last - first
        ctx = tl.minimum(tl.maximum(tl.load(ctx_ptr + s), 0), max_blocks * PAGE)
        j0 = tile * BLOCK_M

        r = tl.arange(0, BLOCK_M * GP)
        i = r // GP  # query row of the tile
        gi = r % GP  # query head within the group
        row_ok = (j0 + i < n) & (gi < G)
        pos = tl.where(row_ok, ctx - n + j0 + i, -1)  # -1: sees no token
        q_row = (first + j0 + i).to(tl.int64) * num_q_heads + h * G + gi
        d = tl.arange(0, D)
        q = tl.load(qrot_ptr + q_row[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M * GP], float("-inf"), tl.float32)  # not a finite floor: any finite score may lead
        l_i = tl.zeros([BLOCK_M * GP], tl.float32)
        acc = tl.zeros([BLOCK_M * GP, D], tl.float32)
        kv_end = tl.minimum(ctx - n + tl.minimum(j0 + BLOCK_M, n), ctx)  # one past the tile's last position
        bt_row = bt_ptr + s.to(tl.int64) * bt_stride
        for t0 in range(0, kv_end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            row, valid = cache_rows(bt_row, t, t < kv_end, num_blocks, num_kv_heads, h, PAGE)
            # float16 cache norms widen exactly: the scores and the ||v|| scaling stay float32
            kn = tl.load(kn_ptr + row, mask=valid, other=0.0).to(tl.float32)
            vn = tl.load(vn_ptr + row, mask=valid, other=0.0).to(tl.float32)
            seen = valid[None, :] & (t[None, :] <= pos[:, None])  # [rows, BLOCK_N] causal mask
            kc = unpack_codes(kw_ptr, kb_ptr, row, BLOCK_N, D, KBITS)
            k = tl.load(kcb_ptr + kc)
            scores = half_dot(q, tl.trans(k), tl.zeros([BLOCK_M * GP, BLOCK_N], tl.float32), UPCAST) * kn[None, :]
            if HAS_MEAN:
                scores += mean_scores(q_ptr, mu_ptr, w_ptr, q_row, row_ok, h, mean_factor, t,
                                      tl.zeros([BLOCK_M * GP, BLOCK_N], tl.float32), D, MEAN_JC, INTERPRET)
            scores = tl.where(seen, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no live score yet: p = 0, no NaN
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(scores - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # P * ||v|| is rounded to the half type: each row divides by the largest norm it sees in
            # the tile first (norms may exceed fp16's range) and scales the product back.
            wn = tl.where(seen, vn[None, :], 0.0)
            v_scale = tl.max(wn, axis=1)
            v_scale = tl.where(v_scale > 0, v_scale, 1.0)
            vc = unpack_codes(vw_ptr, vb_ptr, row, BLOCK_N, D, VBITS)
            v = tl.load(vcb_ptr + vc)
            pv = tl.where(seen, p * (wn / v_scale[:, None]), 0.0).to(v.dtype)
            acc = acc * alpha[:, None] + v_scale[:, None] * half_dot(pv, v, tl.zeros([BLOCK_M * GP, D], tl.float32),
                                                                     UPCAST)
            m_i = m_new

        # zeros only for a row that sees no token (l = 0); a NaN sum stays NaN
        o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
        o = tl.where((l_i == 0)[:, None], 0.0, o)
        tl.store(o_ptr + q_row[:, None] * D + d[None, :], o, mask=row_ok[:, None])


# BLOCK_M * GP, the query rows (positions x group heads) of one program: at 64 rows the loop's
# tiles spilled on sm_90 (offline compile statistics); 32 rows fit in registers at D <= 256.
ROWS_PER_TILE = 32


def tile_rows(group: int) -> tuple[int, int]:
    """(BLOCK_M, GP): positions per tile and the padded group; BLOCK_M * GP rows share each K/V tile."""
    gp = _next_pow2(group)
    return max(1, ROWS_PER_TILE // gp), gp


def supports_paged_prefill(p: PagedPrefillArgs) -> bool:
    """Head dims 32/64/128/256, bits 1-8 (any k_bits, v_bits), power-of-two block sizes, groups of at
    most 64 query heads; with or without key_mean."""
    a = p.attention
    return (C.runs_here(a.device) and a.head_dim in C.SUPPORTED_DIMS and a.k_bits in C.SUPPORTED_BITS
            and a.v_bits in C.SUPPORTED_BITS and a.block_size & (a.block_size - 1) == 0 and a.group <= MAX_GROUP
            and _word_aligned(a.k_codes) and _word_aligned(a.v_codes))


def paged_prefill(p: PagedPrefillArgs, *, block_m=None, block_n=None, num_warps=None, num_stages=None):
    """out [T, Hq, D] in the query's dtype; see the reference prefill attention.

    Keyword-only tuning knobs exist for benchmarks and tests; the defaults come from the shapes."""
    a = p.attention
    t, s, hq, dim, hkv, group, page = p.num_tokens, a.num_seqs, a.num_q_heads, a.head_dim, a.num_kv_heads, a.group, \
        a.block_size
    dev = a.device
    if t == 0 or s == 0:
        return torch.zeros_like(a.query)
    default_m, gp = tile_rows(group)
    block_m = block_m or default_m
    block_n = block_n or (64 if dim <= 128 else 32)
    # 5-7 bit codes take a register per byte load (see paged_attention): twice the warps, as D = 256 does;
    # so does the key-mean term (at 4 warps its cos / sin tiles spilled on sm_90, offline compile statistics)
    bytewise = any(b in (5, 6, 7) for b in (a.k_bits, a.v_bits))
    num_warps = num_warps or (8 if dim > 128 or bytewise or a.key_mean is not None else 4)
    num_stages = num_stages or 2
    half = torch.float16

    rot_t = float_matrix(a.rotation, dev, transpose=True)
    rot = float_matrix(a.rotation, dev)
    q2 = a.query.reshape(t * hq, dim)
    q_rot = (torch.mm(q2.float(), rot_t) * (a.scale * LOG2E)).to(half)
    q2 = q2.contiguous() if a.key_mean is not None else q_rot  # the kernel reads the raw query for the mean only
    # Tiles per sequence from the clamped row ranges, counted on the device (no host read of query_start).
    starts = p.query_start.clamp(0, t)
    counts = torch.maximum(starts[1:], starts[:-1]) - starts[:-1]
    tile_ends = torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0).to(torch.int32)
    bt = a.block_tables if a.block_tables.stride(1) == 1 else a.block_tables.contiguous()
    kc, vc = a.k_codes.contiguous(), a.v_codes.contiguous()
    o = torch.zeros((t * hq, dim), dtype=torch.float32, device=dev)  # rows no sequence owns stay zero
    grid = (math.ceil(t / block_m) + s, hkv)
    prefill_kernel[grid](
        q_rot, C.as_words(kc), kc, a.k_norms.contiguous(), C.as_words(vc), vc, a.v_norms.contiguous(), bt,
        a.context_lens.contiguous(), p.query_start.contiguous(), tile_ends,
        codebook_as(a.k_codebook, half, dev), codebook_as(a.v_codebook, half, dev), o, q2, *mean_inputs(a, q2),
        bt.stride(0), s, t, hq, hkv, a.num_blocks, a.max_blocks, s.bit_length(), a.scale * LOG2E,
        G=group, GP=gp, BLOCK_M=block_m, D=dim, PAGE=page, KBITS=a.k_bits, VBITS=a.v_bits, BLOCK_N=block_n,
        UPCAST=interpreting(), HAS_MEAN=a.key_mean is not None, MEAN_JC=MEAN_CHUNK, INTERPRET=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )
    return torch.mm(o, rot).to(a.query.dtype).reshape(a.query.shape)
