"""A plain float32 paged KV cache: the unquantized twin of the TurboQuant cache.

Same paging (block tables, slots), same write-then-attend order and same causal
rule as TQCacheUpdate + TQPagedPrefill, with the keys and values kept as they
are. A decoder run on it computes what the checkpoint computes, so it is the
check of the decoder itself against transformers, apart from any quantization.

    k_cache, v_cache   [N, B, Hkv, D] float32 per layer
"""

from __future__ import annotations

import torch

from tq_deploy.ops import default_scale
from tq_deploy.reference.paged import gather_tokens, last_writer


def allocate_float_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.zeros(shape, dtype=torch.float32, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device))


def float_cache_update(key, value, slot_mapping, k_cache, v_cache):
    """Store key/value [T, Hkv, D] in their slots, in place (slot < 0 skips; of several tokens naming one
    slot the last is kept, as TQCacheUpdate does)."""
    n, b, hkv, dim = k_cache.shape
    if key.shape[1:] != (hkv, dim) or value.shape != key.shape:
        raise ValueError(f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)}, expected (T, {hkv}, {dim})")
    keep = last_writer(slot_mapping)
    slots = slot_mapping[keep].long()
    if slots.numel() and int(slots.max()) >= n * b:
        raise ValueError(f"slot_mapping has slot {int(slots.max())}, expected < num_blocks*block_size = {n * b}")
    k_cache.view(n * b, hkv, dim)[slots] = key[keep].float()
    v_cache.view(n * b, hkv, dim)[slots] = value[keep].float()
    return k_cache, v_cache


def float_paged_prefill(query, k_cache, v_cache, block_tables, context_lens, query_start, scale: float = 0.0):
    """Causal attention of the packed query rows [T, Hq, D] over each sequence's cache: row j of the
    n rows of sequence s sits at position context_lens[s] - n + j and sees tokens 0..that position."""
    t, hq, dim = query.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    scale = default_scale(dim, scale)
    out = torch.zeros((t, hq, dim), dtype=torch.float32, device=query.device)
    starts = query_start.tolist()
    for s in range(block_tables.shape[0]):
        first, n, ctx = starts[s], starts[s + 1] - starts[s], int(context_lens[s])
        if n == 0:
            continue
        if n > ctx:
            raise ValueError(f"sequence {s} has {n} query rows, expected <= context_lens[{s}] = {ctx}")
        tables, lens = block_tables[s:s + 1], context_lens[s:s + 1]
        keys = gather_tokens(k_cache, tables, lens)[0][0].repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = gather_tokens(v_cache, tables, lens)[0][0].repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,lhd->nhl", query[first:first + n].float(), keys) * scale
        position = torch.arange(ctx - n, ctx, device=query.device)
        causal = torch.arange(ctx, device=query.device)[None, :] <= position[:, None]  # [n, L]
        scores = scores.masked_fill(~causal[:, None, :], float("-inf"))
        out[first:first + n] = torch.einsum("nhl,lhd->nhd", torch.softmax(scores, dim=-1), values)
    return out.to(query.dtype)
