"""Triton kernels for paged TurboQuant decode attention (flash-decoding in the rotated domain).

Three launches:
  qrot_kernel    q_rot = (q @ Pi^T) * scale * log2(e), stored in the compute half type
  split_kernel   one program per (sequence, KV head, split of the context): the GQA
                 group's G query rows (padded to GP >= 16 for the tensor cores) against
                 BLOCK_N tokens at a time. Codes are read packed, dequantized to the half
                 type in registers (centroid lookup), scores = q_rot . c_k^T on the tensor
                 cores, times ||k||; online softmax in base 2; P is scaled by ||v|| before
                 P . c_v. Writes the split's running max m, sum l and accumulator acc.
  reduce_kernel  merges the splits (max-rescaled sums) and rotates back: out = (acc / l) @ Pi.

Tokens past a sequence's context read block 0 (always a valid block) so that code loads
stay unmasked; their scores are -inf and their value norms 0.
"""

import triton
import triton.language as tl

from ._bits import unpack_codes
from ._dot import half_dot

LOG2E = 1.4426950408889634


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
def _lookup(cb_ptr, codes, ROWS: tl.constexpr, BITS: tl.constexpr, LOOKUP: tl.constexpr):
    """Centroids of codes [ROWS, D]: LOOKUP 0 gathers from global memory (L1-resident
    codebook), LOOKUP 1 uses tl.gather on a register copy of the codebook."""
    if LOOKUP == 1:
        table = tl.load(cb_ptr + tl.arange(0, 1 << BITS))
        return tl.gather(tl.broadcast_to(table[None, :], [ROWS, 1 << BITS]), codes, 1)
    else:
        return tl.load(cb_ptr + codes)


@triton.jit
def load_units(bytes_ptr, halves_ptr, words_ptr, row, NU: tl.constexpr, UNIT_BITS: tl.constexpr):
    """[ROWS, NU] int32: the NU equal units (8/16/24/32 bits) of each packed row."""
    u = tl.arange(0, NU)
    if UNIT_BITS == 32:
        x = tl.load(words_ptr + row[:, None] * NU + u[None, :])
    elif UNIT_BITS == 16:
        x = tl.load(halves_ptr + row[:, None] * NU + u[None, :]).to(tl.int32) & 0xFFFF
    elif UNIT_BITS == 8:
        x = tl.load(bytes_ptr + row[:, None] * NU + u[None, :]).to(tl.int32)
    else:  # 24-bit units: three bytes each
        off = row[:, None] * (3 * NU) + u[None, :] * 3
        x = (tl.load(bytes_ptr + off).to(tl.int32) | (tl.load(bytes_ptr + off + 1).to(tl.int32) << 8)
             | (tl.load(bytes_ptr + off + 2).to(tl.int32) << 16))
    return x


@triton.jit
def split_kernel_fields(qrot_ptr, kb_ptr, kh_ptr, kw_ptr, kn_ptr, vb_ptr, vh_ptr, vw_ptr, vn_ptr, bt_ptr, ctx_ptr,
                        kcb_ptr, vcb_ptr, m_ptr, l_ptr, acc_ptr,
                        bt_stride, num_kv_heads, tokens_per_split, num_splits,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                        KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_N: tl.constexpr,
                        KNF: tl.constexpr, VNF: tl.constexpr, UPCAST: tl.constexpr):
    """split_kernel without any reshape of unpacked codes: a packed row is NU = D / NF units of
    NF codes each; field f of every unit (coordinates u * NF + f) forms a [BLOCK_N, NU] tile in
    the layout the units were loaded in. Scores sum one tensor-core dot per key field (q's
    matching columns); values accumulate into acc3 [VNF, GP, NU] with one batched dot."""
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // num_kv_heads
    h = sh % num_kv_heads
    ctx = tl.load(ctx_ptr + s)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)
    KNU: tl.constexpr = D // KNF
    VNU: tl.constexpr = D // VNF

    g = tl.arange(0, GP)
    gmask = g < G
    q_rows = sh.to(tl.int64) * G + g
    ku = tl.arange(0, KNU)

    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    vf = tl.arange(0, VNF)
    vu = tl.arange(0, VNU)
    acc = tl.zeros([VNF, GP, VNU], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * bt_stride
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        blk = tl.load(bt_row + t // PAGE, mask=valid, other=0)
        row = (blk.to(tl.int64) * PAGE + (t % PAGE)) * num_kv_heads + h
        kn = tl.load(kn_ptr + row, mask=valid, other=0.0)
        vn = tl.load(vn_ptr + row, mask=valid, other=0.0)
        xk = load_units(kb_ptr, kh_ptr, kw_ptr, row, KNU, KNF * KBITS)
        xv = load_units(vb_ptr, vh_ptr, vw_ptr, row, VNU, VNF * VBITS)
        scores = tl.zeros([GP, BLOCK_N], tl.float32)
        for f in tl.static_range(KNF):
            q_f = tl.load(qrot_ptr + q_rows[:, None] * D + (ku * KNF + f)[None, :], mask=gmask[:, None], other=0.0)
            k_f = tl.load(kcb_ptr + ((xk >> (f * KBITS)) & ((1 << KBITS) - 1)))
            scores = half_dot(q_f, tl.trans(k_f), scores, UPCAST)
        scores = scores * kn[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        codes3 = (xv[None, :, :] >> (vf * VBITS)[:, None, None]) & ((1 << VBITS) - 1)
        v3 = tl.load(vcb_ptr + codes3)  # [VNF, BLOCK_N, VNU]
        pv = (p * vn[None, :]).to(v3.dtype)
        pv3 = tl.broadcast_to(pv[None, :, :], [VNF, GP, BLOCK_N])
        acc = half_dot(pv3, v3, acc * alpha[None, :, None], UPCAST)
        m_i = m_new

    part = sh.to(tl.int64) * num_splits + split
    tl.store(m_ptr + part * G + g, m_i, mask=gmask)
    tl.store(l_ptr + part * G + g, l_i, mask=gmask)
    cols = vu[None, None, :] * VNF + vf[:, None, None]
    tl.store(acc_ptr + (part * G + g)[None, :, None] * D + cols, acc, mask=gmask[None, :, None])


@triton.jit
def _pair_lookup(lut_ptr, packed):
    """Two fp16 centroids per packed byte: lut [256] int32 holds fp16(c[b & 15]) in its low and
    fp16(c[b >> 4]) in its high half, so one 4-byte load dequantizes two 4-bit codes.
    Returns (even coordinates, odd coordinates), each shaped like ``packed``."""
    v = tl.load(lut_ptr + packed.to(tl.int32))
    lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _pair_lookup_joined(lut_ptr, packed, ROWS: tl.constexpr, D: tl.constexpr):
    """Centroids [ROWS, D] in natural coordinate order from packed bytes [ROWS, D/2] via the
    pair table (low half = even coordinate, high half = the next odd one)."""
    lo, hi = _pair_lookup(lut_ptr, packed)
    return tl.reshape(tl.join(lo, hi), [ROWS, D])


@triton.jit
def split_kernel_pairs_joined(qrot_ptr, kb_ptr, kn_ptr, vb_ptr, vn_ptr, bt_ptr, ctx_ptr, klut_ptr, vlut_ptr,
                              m_ptr, l_ptr, acc_ptr,
                              bt_stride, num_kv_heads, tokens_per_split, num_splits,
                              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                              BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """split_kernel_pairs with the two halves of each table entry joined back into natural
    coordinate order, so each of q.K^T and P.V is one tensor-core dot over D."""
    P: tl.constexpr = D // 2
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // num_kv_heads
    h = sh % num_kv_heads
    ctx = tl.load(ctx_ptr + s)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    mcol = tl.arange(0, P)
    q_rows = sh.to(tl.int64) * G + g
    q = tl.load(qrot_ptr + q_rows[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * bt_stride
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        blk = tl.load(bt_row + t // PAGE, mask=valid, other=0)
        row = (blk.to(tl.int64) * PAGE + (t % PAGE)) * num_kv_heads + h
        kn = tl.load(kn_ptr + row, mask=valid, other=0.0)
        vn = tl.load(vn_ptr + row, mask=valid, other=0.0)
        k = _pair_lookup_joined(klut_ptr, tl.load(kb_ptr + row[:, None] * P + mcol[None, :]), BLOCK_N, D)
        scores = half_dot(q, tl.trans(k), tl.zeros([GP, BLOCK_N], tl.float32), UPCAST) * kn[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _pair_lookup_joined(vlut_ptr, tl.load(vb_ptr + row[:, None] * P + mcol[None, :]), BLOCK_N, D)
        pv = (p * vn[None, :]).to(tl.float16)
        acc = half_dot(pv, v, acc * alpha[:, None], UPCAST)
        m_i = m_new

    part = sh.to(tl.int64) * num_splits + split
    tl.store(m_ptr + part * G + g, m_i, mask=gmask)
    tl.store(l_ptr + part * G + g, l_i, mask=gmask)
    tl.store(acc_ptr + (part * G + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def split_kernel_pairs(qrot_ptr, kb_ptr, kn_ptr, vb_ptr, vn_ptr, bt_ptr, ctx_ptr, klut_ptr, vlut_ptr,
                       m_ptr, l_ptr, acc_ptr,
                       bt_stride, num_kv_heads, tokens_per_split, num_splits,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """split_kernel for 4-bit keys and values without unpacking shifts: the packed bytes
    [BLOCK_N, D/2] (16-byte loads) index a 256-entry pair table; even and odd coordinates form
    two [BLOCK_N, D/2] tiles, so scores = q_even . k_even + q_odd . k_odd and the accumulator is
    kept as its even and odd halves (no reshape, no layout change of unpacked codes)."""
    P: tl.constexpr = D // 2
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // num_kv_heads
    h = sh % num_kv_heads
    ctx = tl.load(ctx_ptr + s)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    g = tl.arange(0, GP)
    gmask = g < G
    mcol = tl.arange(0, P)
    q_rows = sh.to(tl.int64) * G + g
    q_even = tl.load(qrot_ptr + q_rows[:, None] * D + 2 * mcol[None, :], mask=gmask[:, None], other=0.0)
    q_odd = tl.load(qrot_ptr + q_rows[:, None] * D + 2 * mcol[None, :] + 1, mask=gmask[:, None], other=0.0)

    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc_e = tl.zeros([GP, P], tl.float32)
    acc_o = tl.zeros([GP, P], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * bt_stride
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        blk = tl.load(bt_row + t // PAGE, mask=valid, other=0)
        row = (blk.to(tl.int64) * PAGE + (t % PAGE)) * num_kv_heads + h
        kn = tl.load(kn_ptr + row, mask=valid, other=0.0)
        vn = tl.load(vn_ptr + row, mask=valid, other=0.0)
        k_e, k_o = _pair_lookup(klut_ptr, tl.load(kb_ptr + row[:, None] * P + mcol[None, :]))
        scores = half_dot(q_even, tl.trans(k_e), tl.zeros([GP, BLOCK_N], tl.float32), UPCAST)
        scores = half_dot(q_odd, tl.trans(k_o), scores, UPCAST) * kn[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_e, v_o = _pair_lookup(vlut_ptr, tl.load(vb_ptr + row[:, None] * P + mcol[None, :]))
        pv = (p * vn[None, :]).to(tl.float16)
        acc_e = half_dot(pv, v_e, acc_e * alpha[:, None], UPCAST)
        acc_o = half_dot(pv, v_o, acc_o * alpha[:, None], UPCAST)
        m_i = m_new

    part = sh.to(tl.int64) * num_splits + split
    tl.store(m_ptr + part * G + g, m_i, mask=gmask)
    tl.store(l_ptr + part * G + g, l_i, mask=gmask)
    base = acc_ptr + (part * G + g)[:, None] * D + 2 * mcol[None, :]
    tl.store(base, acc_e, mask=gmask[:, None])
    tl.store(base + 1, acc_o, mask=gmask[:, None])


@triton.jit
def split_kernel(qrot_ptr, kw_ptr, kb_ptr, kn_ptr, vw_ptr, vb_ptr, vn_ptr, bt_ptr, ctx_ptr, kcb_ptr, vcb_ptr,
                 m_ptr, l_ptr, acc_ptr,
                 bt_stride, num_kv_heads, tokens_per_split, num_splits,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                 KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 LOOKUP: tl.constexpr, UPCAST: tl.constexpr):
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // num_kv_heads
    h = sh % num_kv_heads
    ctx = tl.load(ctx_ptr + s)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    q_rows = (s * num_kv_heads + h).to(tl.int64) * G + g
    q = tl.load(qrot_ptr + q_rows[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * bt_stride
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        blk = tl.load(bt_row + t // PAGE, mask=valid, other=0)
        row = (blk.to(tl.int64) * PAGE + (t % PAGE)) * num_kv_heads + h
        kn = tl.load(kn_ptr + row, mask=valid, other=0.0)
        vn = tl.load(vn_ptr + row, mask=valid, other=0.0)
        kc = unpack_codes(kw_ptr, kb_ptr, row, BLOCK_N, D, KBITS)
        k = _lookup(kcb_ptr, kc, BLOCK_N, KBITS, LOOKUP)  # [BLOCK_N, D] centroids, half type
        scores = half_dot(q, tl.trans(k), tl.zeros([GP, BLOCK_N], tl.float32), UPCAST) * kn[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vc = unpack_codes(vw_ptr, vb_ptr, row, BLOCK_N, D, VBITS)
        v = _lookup(vcb_ptr, vc, BLOCK_N, VBITS, LOOKUP)
        pv = (p * vn[None, :]).to(v.dtype)
        acc = half_dot(pv, v, acc * alpha[:, None], UPCAST)
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
    m_max = tl.full([GP], -1.0e30, tl.float32)
    for sp in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + (sh * num_splits + sp) * G + g, mask=gmask, other=-1.0e30))
    l_tot = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for sp in range(0, num_splits):
        idx = (sh * num_splits + sp) * G + g
        w = tl.exp2(tl.load(m_ptr + idx, mask=gmask, other=-1.0e30) - m_max)
        l_tot += w * tl.load(l_ptr + idx, mask=gmask, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    o = acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    o = tl.where((l_tot > 0)[:, None], o, 0.0)
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
    m_run = tl.full([SB], -1.0e30, tl.float32)
    for s0 in range(0, num_splits, SB):
        sp = s0 + tl.arange(0, SB)
        idx = (sh * num_splits + sp) * G + g
        m_run = tl.maximum(m_run, tl.load(m_ptr + idx, mask=sp < num_splits, other=-1.0e30))
    m_max = tl.max(m_run, axis=0)
    l_run = tl.zeros([SB], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, num_splits, SB):
        sp = s0 + tl.arange(0, SB)
        smask = sp < num_splits
        idx = (sh * num_splits + sp) * G + g
        w = tl.where(smask, tl.exp2(tl.load(m_ptr + idx, mask=smask, other=-1.0e30) - m_max), 0.0)
        l_run += w * tl.load(l_ptr + idx, mask=smask, other=0.0)
        a = tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        acc += tl.sum(a * w[:, None], axis=0)
    l_tot = tl.sum(l_run, axis=0)
    o = tl.where(l_tot > 0, acc / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
    _rotate_back_row(o, rot_ptr, out_ptr, row, D, BJ)
