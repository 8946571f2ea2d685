"""TQPagedAttention on Triton: flash-decoding in the rotated domain, bits 1-8 for keys and values
independently. The dispatcher runs it where the CUDA library (tq_deploy.cuda) is not built, not
chosen (TQ_DEPLOY_BACKEND=triton) or refuses the call (caches that are not dense).

Three launches:
  qrot_kernel    q_rot = (q @ Pi^T) * scale * log2(e), stored in the compute half type
  split_kernel   one program per (sequence, KV head, split of the context): the GQA
                 group's G query rows (padded to GP >= 16 for the tensor cores) against
                 BLOCK_N tokens at a time. Codes are read packed, dequantized to the half
                 type in registers (centroid lookup), scores = q_rot . c_k^T on the tensor
                 cores, times ||k||; online softmax in base 2; P is scaled by ||v|| before
                 P . c_v. Writes the split's running max m, sum l and accumulator acc.
  reduce_kernel  merges the splits (max-rescaled sums) and rotates back: out = (acc / l) @ Pi
                 (reduce_group_kernel: the same for few splits, one program per group, tensor cores).

With key_mean and rope_inv_freq (HAS_MEAN) the split kernel also adds q . R_t mu to the score of
a token at position t >= 1, before the scale (:func:`mean_scores`): per tile, cos / sin of the
float32 angles t * w and A . cos + B . sin as float32 products, A and B from the unrotated query
rows and the KV head's mean.

Tokens past a sequence's context read block 0 (always a valid block) so that code loads
stay unmasked; their scores are -inf and their value norms 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from tq_deploy.device_constants import cached, codebook_as, float_matrix
from tq_deploy.reference.checks import PagedAttentionArgs

from . import _common as C
from ._bits import unpack_codes
from ._dot import half_dot, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def cos_sin(x, INTERPRET: tl.constexpr):
    """(cos x, sin x) for float32 x up to ~1e7, to about 1e-6: x less the nearest multiple of 2 pi (Cody-Waite,
    2 pi in three float32 parts, one FMA each), then the hardware approximations on [-pi, pi].
    libdevice's cosf / sinf (what tl.cos / tl.sin compile to) inline a Payne-Hanek branch per element,
    which made the split kernel spill on sm_90 (offline compile statistics)."""
    k = tl.floor(x * 0.15915493667125702 + 0.5)
    r = tl.fma(k, -6.2831854820251465, x)
    r = tl.fma(k, 1.7484555314695172e-07, r)
    r = tl.fma(k, 6.8604980400235275e-15, r)
    if INTERPRET:  # the interpreter has no libdevice
        return tl.cos(r), tl.sin(r)
    else:
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)


@triton.jit
def mean_scores(q_ptr, mu_ptr, w_ptr, q_rows, rmask, h, factor, t, extra, D: tl.constexpr, JC: tl.constexpr,
                INTERPRET: tl.constexpr):
    """``extra`` (zeros [rows, BLOCK_N]) + factor * q . R_t mu for the rows q_rows (mask rmask) of the
    unrotated query [*, D] and the tile's positions t [BLOCK_N], 0 where t == 0 (that key is cached with
    its mean): sum_j A_j cos(t w_j) + B_j sin(t w_j), A_j = q_j mu_j + q_j' mu_j', B_j = q_j' mu_j - q_j mu_j'
    (j' = j + D/2, mu = KV head h's mean), in float32 with the angle the float32 product t * w_j.
    JC rates at a time, A and B rebuilt per chunk from the (cached) query rows: holding A, B and a
    [D/2, BLOCK_N] cos / sin tile at once spilled on sm_90 (offline compile statistics)."""
    tf = t.to(tl.float32)
    q_base = q_ptr + q_rows.to(tl.int64)[:, None] * D
    mu_base = mu_ptr + h.to(tl.int64) * D
    for jc in tl.static_range(0, D // 2, JC):
        j = jc + tl.arange(0, JC)
        q1 = tl.load(q_base + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_base + D // 2 + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        m1 = tl.load(mu_base + j)[None, :]
        m2 = tl.load(mu_base + D // 2 + j)[None, :]
        cos, sin = cos_sin(tl.load(w_ptr + j)[:, None] * tf[None, :], INTERPRET)  # [JC, BLOCK_N]
        extra = tl.dot((q1 * m1 + q2 * m2) * factor, cos, extra, input_precision="ieee")
        extra = tl.dot((q2 * m1 - q1 * m2) * factor, sin, extra, input_precision="ieee")
    return tl.where(t[None, :] > 0, extra, 0.0)


@triton.jit
def qrot_kernel(q_ptr, rot_t_ptr, out_ptr, n_rows, scale,
                D: tl.constexpr, BLOCK_R: tl.constexpr, BJ: tl.constexpr):
    """out[r] = (q[r] @ Pi^T) * scale for rows r of q [n_rows, D]; fp32 product."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * D + tl.arange(0, D)[None, :], mask=rmask[:, None], other=0.0)
    q = q.to(tl.float32)
    for jc in tl.static_range(D // BJ):
        cols = jc * BJ + tl.arange(0, BJ)
        rot = tl.load(rot_t_ptr + tl.arange(0, D)[:, None] * D + cols[None, :])
        y = tl.dot(q, rot, input_precision="ieee") * scale
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def cache_rows(bt_row, t, in_range, num_blocks, num_kv_heads, h, PAGE: tl.constexpr):
    """(cache row of KV head h, valid) for the tokens t of one sequence (block table bt_row): a token
    outside ``in_range`` or whose block-table entry is outside [0, num_blocks) is not valid, and its
    row is a safe one (block 0) that the caller masks."""
    blk = tl.load(bt_row + t // PAGE, mask=in_range, other=0)
    listed = (blk >= 0) & (blk < num_blocks)
    blk = tl.where(listed, blk, 0)
    return (blk.to(tl.int64) * PAGE + (t % PAGE)) * num_kv_heads + h, in_range & listed


@triton.jit
def split_kernel(qrot_ptr, kw_ptr, kb_ptr, kn_ptr, vw_ptr, vb_ptr, vn_ptr, bt_ptr, ctx_ptr, kcb_ptr, vcb_ptr,
                 m_ptr, l_ptr, acc_ptr, q_ptr, mu_ptr, w_ptr,
                 bt_stride, num_kv_heads, num_blocks, max_blocks, tokens_per_split, num_splits, mean_factor,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                 KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                 HAS_MEAN: tl.constexpr, MEAN_JC: tl.constexpr, INTERPRET: tl.constexpr):
    """One (sequence, KV head, split). Device data the host never checked is made safe here:
    a context length is clamped to [0, M * B] and tokens whose block-table entry is outside
    [0, N) are skipped, so nothing is read out of bounds."""
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // num_kv_heads
    h = sh % num_kv_heads
    ctx = tl.minimum(tl.maximum(tl.load(ctx_ptr + s), 0), max_blocks * PAGE)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    q_rows = (s * num_kv_heads + h).to(tl.int64) * G + g
    q = tl.load(qrot_ptr + q_rows[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GP], float("-inf"), tl.float32)  # -inf, not a finite floor: any finite score may be the max
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * bt_stride
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        row, valid = cache_rows(bt_row, t, t < end, num_blocks, num_kv_heads, h, PAGE)
        # float16 cache norms widen exactly: the scores and the ||v|| scaling stay float32
        kn = tl.load(kn_ptr + row, mask=valid, other=0.0).to(tl.float32)
        vn = tl.load(vn_ptr + row, mask=valid, other=0.0).to(tl.float32)
        kc = unpack_codes(kw_ptr, kb_ptr, row, BLOCK_N, D, KBITS)
        k = tl.load(kcb_ptr + kc)  # [BLOCK_N, D] centroids, half type (the codebook stays in L1)
        scores = half_dot(q, tl.trans(k), tl.zeros([GP, BLOCK_N], tl.float32), UPCAST) * kn[None, :]
        if HAS_MEAN:
            scores += mean_scores(q_ptr, mu_ptr, w_ptr, q_rows, gmask, h, mean_factor, t,
                                  tl.zeros([GP, BLOCK_N], tl.float32), D, MEAN_JC, INTERPRET)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no live score yet: exp2(-inf - 0) = 0, no NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vc = unpack_codes(vw_ptr, vb_ptr, row, BLOCK_N, D, VBITS)
        v = tl.load(vcb_ptr + vc)
        # P * ||v|| is rounded to the half type: divide by the tile's largest norm first, so that
        # norms beyond the half range (65504 in fp16) cannot overflow, and scale the product back.
        v_scale = tl.max(vn, axis=0)
        v_scale = tl.where(v_scale > 0, v_scale, 1.0)
        pv = (p * (vn / v_scale)[None, :]).to(v.dtype)
        acc = acc * alpha[:, None] + v_scale * half_dot(pv, v, tl.zeros([GP, D], tl.float32), UPCAST)
        m_i = m_new

    part = sh.to(tl.int64) * num_splits + split
    tl.store(m_ptr + part * G + g, m_i, mask=gmask)
    tl.store(l_ptr + part * G + g, l_i, mask=gmask)
    tl.store(acc_ptr + (part * G + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def reduce_group_kernel(m_ptr, l_ptr, acc_ptr, rot_ptr, out_ptr, num_splits,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """The G output rows of one (sequence, KV head): merge few splits, then (acc / l) @ Pi
    on the tensor-core path (fp32, ieee) with the group padded to GP >= 16 rows."""
    sh = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    m_max = tl.full([GP], float("-inf"), tl.float32)
    for sp in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + (sh * num_splits + sp) * G + g, mask=gmask, other=float("-inf")))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights exp2(-inf) = 0
    l_tot = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for sp in range(0, num_splits):
        idx = (sh * num_splits + sp) * G + g
        w = tl.exp2(tl.load(m_ptr + idx, mask=gmask, other=float("-inf")) - m_max)
        l_tot += w * tl.load(l_ptr + idx, mask=gmask, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    # zeros only for an empty context (l = 0); a NaN sum stays NaN
    o = acc / tl.where(l_tot == 0, 1.0, l_tot)[:, None]
    o = tl.where((l_tot == 0)[:, None], 0.0, o)
    for jc in tl.static_range(D // BJ):
        cols = jc * BJ + tl.arange(0, BJ)
        rot = tl.load(rot_ptr + d[:, None] * D + cols[None, :])
        y = tl.dot(o, rot, input_precision="ieee")
        tl.store(out_ptr + (sh * G + g)[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])


@triton.jit
def _rotate_back_row(o, rot_ptr, out_ptr, out_row, D: tl.constexpr, BJ: tl.constexpr):
    """out[out_row] = o @ Pi for one row o [D] (fp32 multiply-sum; Pi [D, D] row-major)."""
    d = tl.arange(0, D)
    for jc in tl.static_range(D // BJ):
        cols = jc * BJ + tl.arange(0, BJ)
        rot = tl.load(rot_ptr + d[:, None] * D + cols[None, :])
        y = tl.sum(o[:, None] * rot, axis=0)
        tl.store(out_ptr + out_row * D + cols, y.to(out_ptr.dtype.element_ty))


@triton.jit
def reduce_kernel(m_ptr, l_ptr, acc_ptr, rot_ptr, out_ptr, num_splits,
                  G: tl.constexpr, D: tl.constexpr, SB: tl.constexpr, BJ: tl.constexpr):
    """One output row (sequence, query head): merge the splits' partials, then (acc / l) @ Pi."""
    row = tl.program_id(0).to(tl.int64)  # = (s * Hkv + h) * G + g
    sh = row // G
    g = row % G
    d = tl.arange(0, D)
    m_run = tl.full([SB], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, SB):
        sp = s0 + tl.arange(0, SB)
        idx = (sh * num_splits + sp) * G + g
        m_run = tl.maximum(m_run, tl.load(m_ptr + idx, mask=sp < num_splits, other=float("-inf")))
    m_max = tl.max(m_run, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights exp2(-inf) = 0
    l_run = tl.zeros([SB], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, num_splits, SB):
        sp = s0 + tl.arange(0, SB)
        smask = sp < num_splits
        idx = (sh * num_splits + sp) * G + g
        w = tl.where(smask, tl.exp2(tl.load(m_ptr + idx, mask=smask, other=float("-inf")) - m_max), 0.0)
        l_run += w * tl.load(l_ptr + idx, mask=smask, other=0.0)
        a = tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        acc += tl.sum(a * w[:, None], axis=0)
    l_tot = tl.sum(l_run, axis=0)
    o = tl.where(l_tot == 0, 0.0, acc / tl.where(l_tot == 0, 1.0, l_tot))
    _rotate_back_row(o, rot_ptr, out_ptr, row, D, BJ)


MIN_SPLIT_TOKENS = 256
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128
GROUP_REDUCE_MAX_SPLITS = 4  # few splits: one reduce program per group (tensor-core rotate-back)
MAX_GROUP = 64
MEAN_CHUNK = 16  # RoPE rates per cos / sin tile of the key-mean term

_sm_count: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_splits(num_pairs: int, max_tokens: int, block_n: int, num_sms: int,
                  programs_per_sm: int = PROGRAMS_PER_SM, min_split_tokens: int = MIN_SPLIT_TOKENS) -> tuple[int, int]:
    """(num_splits, tokens_per_split) for num_pairs (sequence, KV head) programs over max_tokens.

    Flash-decoding: with few pairs and long contexts the context is cut so that about
    ``programs_per_sm x SMs`` programs run; each split covers whole BLOCK_N tiles and at least
    ``min_split_tokens`` tokens. Decided from the shapes only (block-table width x block size),
    never from context_lens' values, so there is no host synchronization."""
    tiles = max(1, math.ceil(max_tokens / block_n))
    want = max(1, (programs_per_sm * num_sms) // max(num_pairs, 1))
    max_by_len = max(1, max_tokens // max(min_split_tokens, block_n))
    splits = max(1, min(want, max_by_len, MAX_SPLITS, tiles))
    tiles_per_split = math.ceil(tiles / splits)
    splits = math.ceil(tiles / tiles_per_split)
    return splits, tiles_per_split * block_n


def _word_aligned(t: torch.Tensor) -> bool:
    return t.storage_offset() % 4 == 0 or not t.is_contiguous()  # non-contiguous codes are copied fresh


def supports_paged_attention(a: PagedAttentionArgs) -> bool:
    """Head dims 32/64/128/256, bits 1-8 (any k_bits, v_bits), power-of-two block sizes, groups of at
    most 64 query heads; with or without key_mean."""
    return (C.runs_here(a.device) and a.head_dim in C.SUPPORTED_DIMS and a.k_bits in C.SUPPORTED_BITS
            and a.v_bits in C.SUPPORTED_BITS and a.block_size & (a.block_size - 1) == 0 and a.group <= MAX_GROUP
            and _word_aligned(a.k_codes) and _word_aligned(a.v_codes))


def mean_inputs(a: PagedAttentionArgs, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key_mean and rope_inv_freq as contiguous float32 on the kernel's device (model constants: converted
    once), or ``dummy`` twice when the call has none (the kernel reads them only with HAS_MEAN)."""
    if a.key_mean is None:
        return dummy, dummy
    dev = str(a.device)
    return tuple(cached("mean_f32", x, lambda x=x: x.detach().to(a.device, torch.float32).contiguous(), dev)
                 for x in (a.key_mean, a.rope_inv_freq))


def paged_attention(a: PagedAttentionArgs, *, block_n=None, num_splits=None, num_warps=None, num_stages=None):
    """out [S, Hq, D] in the query's dtype; see the reference paged attention.

    Keyword-only tuning knobs exist for the benchmark; the defaults come from the shapes."""
    s, hq, dim, hkv, group, page = a.num_seqs, a.num_q_heads, a.head_dim, a.num_kv_heads, a.group, a.block_size
    dev = a.device
    out = torch.empty_like(a.query)
    if s == 0:
        return out
    gp = max(16, _next_pow2(group))
    half = torch.float16
    # defaults: the fastest validated knobs at D=128 (docs/performance.md, History)
    block_n = block_n or (64 if dim <= 128 else 32)
    # 5-7 bit codes are read as 5-7 byte loads per 8 codes, a register each: at the 1-4 bit warp
    # counts the split kernel spills on sm_90 (1.2 KB a thread for 5-bit K and V at D=128); twice
    # the warps spill at most 56 bytes (compile statistics)
    bytewise = any(b in (5, 6, 7) for b in (a.k_bits, a.v_bits))
    if num_warps is None:
        num_warps = (2 if dim <= 128 else 4) * (2 if bytewise else 1)
        # the key-mean term's cos / sin tiles: twice the warps where the split kernel would spill with them
        # on sm_90 (D <= 64; 5-7 bit codes at D = 128), offline compile statistics
        if a.key_mean is not None and (dim <= 64 or (bytewise and dim <= 128)):
            num_warps *= 2
    num_stages = num_stages or 2
    max_tokens = a.max_blocks * page
    if num_splits is None:
        splits, per_split = choose_splits(s * hkv, max_tokens, block_n, _num_sms(dev))
    else:
        tiles = max(1, math.ceil(max_tokens / block_n))
        per_split = math.ceil(tiles / max(1, num_splits)) * block_n
        splits = max(1, math.ceil(max(max_tokens, 1) / per_split))

    rot_t = float_matrix(a.rotation, dev, transpose=True)
    rot = float_matrix(a.rotation, dev)
    q2 = a.query.reshape(s * hq, dim).contiguous()
    q_rot = torch.empty((s * hq, dim), dtype=half, device=dev)
    qrot_kernel[(math.ceil(s * hq / 16),)](q2, rot_t, q_rot, s * hq, a.scale * LOG2E,
                                            D=dim, BLOCK_R=16, BJ=min(dim, 64), num_warps=4)
    bt = a.block_tables if a.block_tables.stride(1) == 1 else a.block_tables.contiguous()
    kc, vc = a.k_codes.contiguous(), a.v_codes.contiguous()
    m = torch.empty((s * hkv, splits, group), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty((s * hkv, splits, group, dim), dtype=torch.float32, device=dev)
    split_kernel[(s * hkv, splits)](
        q_rot, C.as_words(kc), kc, a.k_norms.contiguous(), C.as_words(vc), vc, a.v_norms.contiguous(), bt,
        a.context_lens.contiguous(), codebook_as(a.k_codebook, half, dev), codebook_as(a.v_codebook, half, dev),
        m, l, acc, q2, *mean_inputs(a, q2),
        bt.stride(0), hkv, a.num_blocks, a.max_blocks, per_split, splits, a.scale * LOG2E,
        G=group, GP=gp, D=dim, PAGE=page, KBITS=a.k_bits, VBITS=a.v_bits, BLOCK_N=block_n, UPCAST=interpreting(),
        HAS_MEAN=a.key_mean is not None, MEAN_JC=MEAN_CHUNK, INTERPRET=interpreting(), num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits <= GROUP_REDUCE_MAX_SPLITS:
        reduce_group_kernel[(s * hkv,)](m, l, acc, rot, out, splits, G=group, GP=gp, D=dim, BJ=min(dim, 32),
                                        num_warps=4)
    else:
        sb = min(_next_pow2(splits), max(1, 8192 // dim))
        reduce_kernel[(s * hq,)](m, l, acc, rot, out, splits, G=group, D=dim, SB=sb, BJ=min(dim, 32), num_warps=4)
    return out
