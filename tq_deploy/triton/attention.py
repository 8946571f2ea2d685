"""Paged TurboQuant decode attention on the Triton kernels (same signature as the reference).

Split-K heuristic (flash-decoding): with few (sequence, KV head) pairs and long
contexts the context is cut into splits so that about ``4 x SMs`` programs run;
each split covers whole BLOCK_N tiles and at least MIN_SPLIT_TOKENS tokens.
The split count is decided from the shapes only (max blocks per sequence x
block size), never from context_lens' values, so there is no host sync.
"""

from __future__ import annotations

import math

import torch

from . import _common as C
from ._dot import interpreting
from ._attention_kernels import (
    LOG2E,
    qrot_kernel,
    reduce_group_kernel,
    reduce_kernel,
    split_kernel,
    split_kernel_fields,
    split_kernel_pairs,
    split_kernel_pairs_joined,
)

MIN_SPLIT_TOKENS = 256
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128
GROUP_REDUCE_MAX_SPLITS = 4  # few splits: one reduce program per group (tensor-core rotate-back)
DEFAULT_LOOKUP = 0
# 0: split_kernel (measured fastest on the H200); 1: split_kernel_fields where unit_fields() allows;
# 2: split_kernel_pairs for 4-bit K and V (byte -> two-centroid table, even/odd tiles);
# 3: split_kernel_pairs_joined (the same table, natural order). 2 and 3 are not yet timed on a GPU:
# their sm_90 loop issues ~40% fewer instructions per token-head than 0 (sass_report.py).
DEFAULT_LAYOUT = 0

_sm_count: dict = {}
# the compiled kernels of the last call (registers, spills, SASS for scripts/gpu_check.sh)
last_compiled: dict = {}


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
    """(num_splits, tokens_per_split) for num_pairs (sequence, KV head) programs over max_tokens."""
    tiles = max(1, math.ceil(max_tokens / block_n))
    want = max(1, (programs_per_sm * num_sms) // max(num_pairs, 1))
    max_by_len = max(1, max_tokens // max(min_split_tokens, block_n))
    splits = max(1, min(want, max_by_len, MAX_SPLITS, tiles))
    tiles_per_split = math.ceil(tiles / splits)
    splits = math.ceil(tiles / tiles_per_split)
    return splits, tiles_per_split * block_n


def unit_fields(dim: int, bits: int):
    """(codes per unit NF, unit bits) so that a packed row is >= 16 equal units, or None."""
    units = (24,) if bits == 3 else (32, 16, 8)
    for unit in units:
        nf = unit // bits
        if dim % nf == 0 and dim // nf >= 16:
            return nf, unit
    return None


def _halves(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.int16) if codes.shape[-1] % 2 == 0 else codes


def _check(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
           k_codebook, v_codebook, k_bits, v_bits):
    C.check_bits("k_bits", k_bits)
    C.check_bits("v_bits", v_bits)
    C.check_dtype("query", query, C.FLOAT_DTYPES)
    if query.dim() != 3:
        raise ValueError(f"query: rank {query.dim()}, expected 3 [S, Hq, D]")
    s, hq, dim = query.shape
    C.check_dim("query", dim)
    C.check_rotation(rotation, dim)
    C.check_codebook("k_codebook", k_codebook, k_bits)
    C.check_codebook("v_codebook", v_codebook, v_bits)
    if k_codes.dim() != 4:
        raise ValueError(f"k_codes: rank {k_codes.dim()}, expected 4 [N, B, Hkv, Pk]")
    n, page, hkv, _ = k_codes.shape
    for name, codes, norms, bits in (("k", k_codes, k_norms, k_bits), ("v", v_codes, v_norms, v_bits)):
        p = C.packed_size(dim, bits)
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, page, hkv, p):
            raise ValueError(f"{name}_codes: {codes.dtype} {tuple(codes.shape)}, expected uint8 {(n, page, hkv, p)}")
        if norms.dtype != torch.float32 or tuple(norms.shape) != (n, page, hkv):
            raise ValueError(f"{name}_norms: {norms.dtype} {tuple(norms.shape)}, expected float32 {(n, page, hkv)}")
    if hq % hkv:
        raise ValueError(f"query: {hq} heads, expected a multiple of the cache's {hkv} KV heads")
    if hq // hkv > 64:
        raise ValueError(f"query: group size {hq // hkv}, expected <= 64 for the Triton kernel")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != s:
        raise ValueError(f"block_tables: {block_tables.dtype} {tuple(block_tables.shape)}, expected int32 [{s}, M]")
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (s,):
        raise ValueError(f"context_lens: {context_lens.dtype} {tuple(context_lens.shape)}, expected int32 [{s}]")
    return s, hq, dim, n, page, hkv


def paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                    k_codebook, v_codebook, k_bits, v_bits, scale=0.0, *, block_n=None, num_splits=None,
                    num_warps=None, num_stages=None, lookup=None, layout=None):
    """out [S, Hq, D] in query's dtype; see the reference paged_attention.

    Keyword-only tuning knobs (block_n, num_splits, num_warps, num_stages, lookup) exist
    for the benchmark; the defaults come from the shapes.
    """
    s, hq, dim, n, page, hkv = _check(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                      rotation, k_codebook, v_codebook, k_bits, v_bits)
    dev = query.device
    out = torch.empty_like(query)
    if s == 0:
        return out
    group = hq // hkv
    gp = max(16, _next_pow2(group))
    sm_scale = scale if scale > 0 else 1.0 / math.sqrt(dim)
    half = torch.float16

    # defaults: the fastest validated knobs of the H200 sweep at D=128 (docs/performance.md)
    if block_n is None:
        block_n = 64 if dim <= 128 else 32
    if num_warps is None:
        num_warps = 2 if dim <= 128 else 4
    if num_stages is None:
        num_stages = 2
    max_tokens = block_tables.shape[1] * page
    if num_splits is None:
        splits, per_split = choose_splits(s * hkv, max_tokens, block_n, _num_sms(dev))
    else:
        tiles = max(1, math.ceil(max_tokens / block_n))
        per_split = math.ceil(tiles / max(1, num_splits)) * block_n
        splits = max(1, math.ceil(max(max_tokens, 1) / per_split))

    rot_t = C.float_matrix(rotation, dev, transpose=True)
    rot = C.float_matrix(rotation, dev, transpose=False)
    q2 = query.reshape(s * hq, dim).contiguous()
    q_rot = torch.empty((s * hq, dim), dtype=half, device=dev)
    qrot_kernel[(math.ceil(s * hq / 16),)](q2, rot_t, q_rot, s * hq, sm_scale * LOG2E,
                                            D=dim, BLOCK_R=16, BJ=min(dim, 64), num_warps=4)

    kcb = C.codebook_as(k_codebook, half, dev)
    vcb = C.codebook_as(v_codebook, half, dev)
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    ctx = context_lens.contiguous()
    kc, vc = k_codes.contiguous(), v_codes.contiguous()
    kn, vn = k_norms.contiguous(), v_norms.contiguous()
    m = torch.empty((s * hkv, splits, group), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty((s * hkv, splits, group, dim), dtype=torch.float32, device=dev)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    kf, vf = unit_fields(dim, k_bits), unit_fields(dim, v_bits)
    if layout is None:
        layout = DEFAULT_LAYOUT
    if layout in (2, 3) and k_bits == 4 and v_bits == 4:
        kernel = split_kernel_pairs if layout == 2 else split_kernel_pairs_joined
        last_compiled["split"] = kernel[(s * hkv, splits)](
            q_rot, kc, kn, vc, vn, bt, ctx, C.pair_table(k_codebook, dev), C.pair_table(v_codebook, dev),
            m, l, acc,
            bt.stride(0), hkv, per_split, splits,
            G=group, GP=gp, D=dim, PAGE=page, BLOCK_N=block_n, UPCAST=interpreting(),
            num_warps=num_warps, **extra,
        )
    elif layout == 1 and kf is not None and vf is not None:
        last_compiled["split"] = split_kernel_fields[(s * hkv, splits)](
            q_rot, kc, _halves(kc), C.as_words(kc), kn, vc, _halves(vc), C.as_words(vc), vn, bt, ctx, kcb, vcb,
            m, l, acc,
            bt.stride(0), hkv, per_split, splits,
            G=group, GP=gp, D=dim, PAGE=page, KBITS=k_bits, VBITS=v_bits, BLOCK_N=block_n,
            KNF=kf[0], VNF=vf[0], UPCAST=interpreting(), num_warps=num_warps, **extra,
        )
    else:
        last_compiled["split"] = split_kernel[(s * hkv, splits)](
            q_rot, C.as_words(kc), kc, kn, C.as_words(vc), vc, vn, bt, ctx, kcb, vcb,
            m, l, acc,
            bt.stride(0), hkv, per_split, splits,
            G=group, GP=gp, D=dim, PAGE=page, KBITS=k_bits, VBITS=v_bits, BLOCK_N=block_n,
            LOOKUP=DEFAULT_LOOKUP if lookup is None else lookup, UPCAST=interpreting(),
            num_warps=num_warps, **extra,
        )
    if splits <= GROUP_REDUCE_MAX_SPLITS:
        last_compiled["reduce"] = reduce_group_kernel[(s * hkv,)](m, l, acc, rot, out, splits, G=group, GP=gp, D=dim,
                                                                  BJ=min(dim, 32), num_warps=4)
    else:
        sb = min(_next_pow2(splits), max(1, 8192 // dim))
        last_compiled["reduce"] = reduce_kernel[(s * hq,)](m, l, acc, rot, out, splits, G=group, D=dim, SB=sb,
                                                           BJ=min(dim, 32), num_warps=4)
    return out
