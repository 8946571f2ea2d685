"""Paged TurboQuant KV cache and fused decode attention in the rotated domain.

Layout (vLLM-style): the cache is N blocks of B token slots each; a sequence's
token t lives in block ``block_tables[s, t // B]`` at offset ``t % B`` and its
flat slot is ``block * B + offset``. Per slot and KV head the cache stores the
packed codes and the norm of the key and of the value, float32 or float16 (the
float32 norm rounded to nearest even; the codes are chosen with the float32 norm).

Decode attention never leaves the rotated domain until the very end. With
k_t = ||k_t|| Pi^T c_k[idx_k_t] and Pi orthogonal,

    <q, k_t> = ||k_t|| <Pi q, c_k[idx_k_t]>
    sum_t p_t v_t = Pi^T sum_t p_t ||v_t|| c_v[idx_v_t]

so the query is rotated once (q_rot = Pi q), scores are dot products with
centroids, the weighted sum of value centroids is accumulated in rotated
coordinates and rotated back once: out = Pi^T acc.

A cache may hold its keys without a mean mu taken before RoPE (k_t - R_t mu at
positions t >= 1): <q, R_t mu> is added back to those scores
(:func:`key_mean_scores`), from the unrotated query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tq_deploy.ops import packed_size
from tq_deploy.reference.checks import (
    NORM_DTYPES,
    CacheUpdateArgs,
    PagedAttentionArgs,
    PagedPrefillArgs,
    check_bits,
    check_cache,
    check_cache_update,
    check_head_dim,
    check_paged_attention,
    check_paged_prefill,
)
from tq_deploy.reference.packing import unpack_codes
from tq_deploy.reference.quantizer import decode_reference, encode_reference

__all__ = ["PagedTQCache", "allocate_cache", "check_cache", "cache_update_reference", "cache_update_checked",
           "paged_attention_reference", "paged_attention_checked", "key_mean_scores",
           "paged_prefill_reference", "paged_prefill_checked", "dense_attention_reference", "gather_tokens", "rope_turned"]


@dataclass
class PagedTQCache:
    """The four tensors of one layer's TurboQuant paged KV cache."""

    k_codes: torch.Tensor  # [N, B, Hkv, Pk] uint8
    k_norms: torch.Tensor  # [N, B, Hkv] float32 or float16
    v_codes: torch.Tensor  # [N, B, Hkv, Pv] uint8
    v_norms: torch.Tensor  # [N, B, Hkv] like k_norms

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k_codes, self.k_norms, self.v_codes, self.v_norms

    @property
    def num_blocks(self) -> int:
        return self.k_codes.shape[0]

    @property
    def block_size(self) -> int:
        return self.k_codes.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def allocate_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   k_bits: int, v_bits: int, device=None, norm_dtype=torch.float32) -> PagedTQCache:
    """An all-zero cache (zero codes and norms decode to zero vectors); its norms are ``norm_dtype``
    (float32 or float16)."""
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}, expected an int >= 1")
    check_head_dim("head_dim", head_dim)
    if norm_dtype not in NORM_DTYPES:
        raise ValueError(f"norm_dtype={norm_dtype}, expected one of {NORM_DTYPES}")
    shape = (num_blocks, block_size, num_kv_heads)
    return PagedTQCache(
        torch.zeros(*shape, packed_size(head_dim, check_bits("k_bits", k_bits)), dtype=torch.uint8, device=device),
        torch.zeros(shape, dtype=norm_dtype, device=device),
        torch.zeros(*shape, packed_size(head_dim, check_bits("v_bits", v_bits)), dtype=torch.uint8, device=device),
        torch.zeros(shape, dtype=norm_dtype, device=device),
    )


def cache_update_reference(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                           rotation, k_codebook, v_codebook, k_bits, v_bits):
    """Encode key/value [T, Hkv, D] into their slots, in place; slot < 0 skips a token, and when
    several tokens name one slot the last of them is kept."""
    return cache_update_checked(check_cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                                   rotation, k_codebook, v_codebook, k_bits, v_bits))


def last_writer(slot_mapping: torch.Tensor) -> torch.Tensor:
    """True for each token whose slot is >= 0 and named by no later token."""
    t = slot_mapping.shape[0]
    order = torch.argsort(slot_mapping, stable=True)
    ordered = slot_mapping[order]
    last = torch.ones(t, dtype=torch.bool, device=slot_mapping.device)
    last[:-1] = ordered[:-1] != ordered[1:]
    keep = torch.empty_like(last)
    keep[order] = last
    return keep & (slot_mapping >= 0)


def cache_update_checked(a: CacheUpdateArgs):
    keep = last_writer(a.slot_mapping)
    slots = a.slot_mapping[keep].long()
    kc, kn = encode_reference(a.key[keep], a.rotation, a.k_codebook, a.k_bits)
    vc, vn = encode_reference(a.value[keep], a.rotation, a.v_codebook, a.v_bits)
    rows, hkv = a.num_blocks * a.block_size, a.num_kv_heads
    a.k_codes.view(rows, hkv, -1)[slots] = kc
    # A float16 cache rounds each float32 norm to nearest even (+inf from 65520 on); the codes were
    # chosen with the float32 norm.
    a.k_norms.view(rows, hkv)[slots] = kn.to(a.k_norms.dtype)
    a.v_codes.view(rows, hkv, -1)[slots] = vc
    a.v_norms.view(rows, hkv)[slots] = vn.to(a.v_norms.dtype)
    return a.k_codes, a.k_norms, a.v_codes, a.v_norms


def gather_tokens(cache_tensor: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor):
    """Per-sequence view of a paged tensor: [S, L, ...] with L = max context, plus the valid mask."""
    b = cache_tensor.shape[1]
    length = int(context_lens.max()) if context_lens.numel() else 0
    t = torch.arange(length, device=block_tables.device)
    valid = t[None, :] < context_lens[:, None].long()
    blocks = torch.where(valid, block_tables[:, t // b].long(), 0)
    return cache_tensor[blocks, (t % b)[None, :].expand_as(blocks)], valid


def key_mean_scores(query: torch.Tensor, key_mean: torch.Tensor, rope_inv_freq: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """<q, R_t mu> for query rows [R, Hkv, G, D] (float32) and cache positions t [L]: [R, Hkv, G, L],
    0 where t == 0 (that key is cached with its mean).

    R_t turns the pair (j, j + D/2) by t * w_j, so with A_j = q_j mu_j + q_j' mu_j' and
    B_j = q_j' mu_j - q_j mu_j' (j' = j + D/2): <q, R_t mu> = sum_j A_j cos(t w_j) + B_j sin(t w_j).
    """
    half = query.shape[-1] // 2
    mu = key_mean.to(query.device, torch.float32)[None, :, None, :]  # [1, Hkv, 1, D]
    q1, q2, m1, m2 = query[..., :half], query[..., half:], mu[..., :half], mu[..., half:]
    a, b = q1 * m1 + q2 * m2, q2 * m1 - q1 * m2
    angle = positions.to(torch.float32)[:, None] * rope_inv_freq.to(query.device, torch.float32)[None, :]
    scores = a @ torch.cos(angle).T + b @ torch.sin(angle).T
    return scores.masked_fill(positions == 0, 0.0)


def paged_attention_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                              rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None,
                              rope_inv_freq=None):
    """Fused decode attention in the rotated domain (module docstring); out[S, Hq, D] in query's dtype."""
    return paged_attention_checked(check_paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables,
                                                         context_lens, rotation, k_codebook, v_codebook, k_bits,
                                                         v_bits, scale, key_mean, rope_inv_freq))


def paged_attention_checked(a: PagedAttentionArgs):
    s, hq, dim, hkv, group = a.num_seqs, a.num_q_heads, a.head_dim, a.num_kv_heads, a.group
    device = a.query.device
    rotation = a.rotation.to(device)
    q_rot = (a.query.float() @ rotation.T).reshape(s, hkv, group, dim)
    k_idx, valid = gather_tokens(a.k_codes, a.block_tables, a.context_lens)
    v_idx, _ = gather_tokens(a.v_codes, a.block_tables, a.context_lens)
    # Masked tokens read slot 0 of block 0, which may hold anything (inf, NaN): zero their norms
    # so that 0 * garbage never reaches the sums.
    k_norm = gather_tokens(a.k_norms, a.block_tables, a.context_lens)[0].float().masked_fill(~valid[..., None], 0.0)
    v_norm = gather_tokens(a.v_norms, a.block_tables, a.context_lens)[0].float().masked_fill(~valid[..., None], 0.0)
    k_cent = a.k_codebook.to(device)[unpack_codes(k_idx, a.k_bits, dim).long()]  # [S, L, Hkv, D]
    v_cent = a.v_codebook.to(device)[unpack_codes(v_idx, a.v_bits, dim).long()]
    if a.key_mean is None:
        scores = torch.einsum("shgd,slhd->shgl", q_rot, k_cent) * (k_norm.permute(0, 2, 1)[:, :, None, :] * a.scale)
    else:
        scores = torch.einsum("shgd,slhd->shgl", q_rot, k_cent) * k_norm.permute(0, 2, 1)[:, :, None, :]
        scores = scores + key_mean_scores(a.query.float().reshape(s, hkv, group, dim), a.key_mean, a.rope_inv_freq,
                                          torch.arange(valid.shape[1], device=device))
        scores = scores * a.scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A context of 0 tokens gives zeros; any other row keeps what softmax gives (NaN from a NaN or
    # overflowing score stays NaN: never hidden as zeros).
    probs = probs.masked_fill((a.context_lens == 0)[:, None, None, None], 0.0)
    weights = probs * v_norm.permute(0, 2, 1)[:, :, None, :]
    acc = torch.einsum("shgl,slhd->shgd", weights, v_cent)
    return (acc.reshape(s, hq, dim) @ rotation).to(a.query.dtype)


def paged_prefill_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start,
                            rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None,
                            rope_inv_freq=None):
    """Causal multi-token attention over the paged cache (TQPagedPrefill): out[T, Hq, D] in query's dtype."""
    return paged_prefill_checked(check_paged_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables,
                                                     context_lens, query_start, rotation, k_codebook, v_codebook,
                                                     k_bits, v_bits, scale, key_mean, rope_inv_freq))


def paged_prefill_checked(p: PagedPrefillArgs):
    """Per sequence: the n new query rows at positions ctx - n .. ctx - 1, each attending causally to
    tokens 0..position, in the rotated domain as the decode attention does."""
    a = p.attention
    hq, dim, hkv, group = a.num_q_heads, a.head_dim, a.num_kv_heads, a.group
    device = a.query.device
    rotation = a.rotation.to(device)
    k_codebook, v_codebook = a.k_codebook.to(device), a.v_codebook.to(device)
    out = torch.zeros(a.query.shape, dtype=torch.float32, device=device)
    starts = p.query_start.tolist()
    for s in range(a.num_seqs):
        first, n, ctx = starts[s], starts[s + 1] - starts[s], int(a.context_lens[s])
        if n == 0:
            continue
        tables, lens = a.block_tables[s:s + 1], a.context_lens[s:s + 1]
        k_cent = k_codebook[unpack_codes(gather_tokens(a.k_codes, tables, lens)[0][0], a.k_bits, dim).long()]
        v_cent = v_codebook[unpack_codes(gather_tokens(a.v_codes, tables, lens)[0][0], a.v_bits, dim).long()]
        k_norm = gather_tokens(a.k_norms, tables, lens)[0][0].float().T  # [Hkv, L]
        v_norm = gather_tokens(a.v_norms, tables, lens)[0][0].float().T
        query = a.query[first:first + n].float()
        q_rot = (query @ rotation.T).reshape(n, hkv, group, dim)
        if a.key_mean is None:
            scores = torch.einsum("nhgd,lhd->nhgl", q_rot, k_cent) * (k_norm[None, :, None, :] * a.scale)
        else:
            scores = torch.einsum("nhgd,lhd->nhgl", q_rot, k_cent) * k_norm[None, :, None, :]
            scores = scores + key_mean_scores(query.reshape(n, hkv, group, dim), a.key_mean, a.rope_inv_freq,
                                              torch.arange(ctx, device=device))
            scores = scores * a.scale
        position = torch.arange(ctx - n, ctx, device=device)
        causal = (torch.arange(ctx, device=device)[None, :] <= position[:, None])[:, None, None, :]  # [n, 1, 1, L]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        # The norms carry the values' magnitude and the centroids are finite, so masking the weights
        # keeps a row's later tokens (a chunk's own future, NaN or not) out of its sum exactly.
        weights = (probs * v_norm[None, :, None, :]).masked_fill(~causal, 0.0)
        acc = torch.einsum("nhgl,lhd->nhgd", weights, v_cent)
        out[first:first + n] = acc.reshape(n, hq, dim) @ rotation
    return out.to(a.query.dtype)


def rope_turned(vector: torch.Tensor, rope_inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """R_t x for x [..., D] and positions [L]: [L, ..., D] (pairs (j, j + D/2), angle t * w_j)."""
    half = vector.shape[-1] // 2
    angle = positions.float()[:, None] * rope_inv_freq.float()[None, :]  # [L, D/2]
    shape = (angle.shape[0],) + (1,) * (vector.dim() - 1) + (half,)
    cos, sin = torch.cos(angle).reshape(shape), torch.sin(angle).reshape(shape)
    x1, x2 = vector.float()[..., :half], vector.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def dense_attention_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                              rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None,
                              rope_inv_freq=None):
    """The oracle: decode K and V to full vectors (a key at position t >= 1 with R_t key_mean added
    back), then plain softmax attention per sequence."""
    a = check_paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                              k_codebook, v_codebook, k_bits, v_bits, scale, key_mean, rope_inv_freq)
    dim, group = a.head_dim, a.group
    keys = decode_reference(k_codes, k_norms.float(), rotation, k_codebook, k_bits)  # [N, B, Hkv, D]
    values = decode_reference(v_codes, v_norms.float(), rotation, v_codebook, v_bits)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for s in range(query.shape[0]):  # the oracle favours plainness over speed
        ctx = int(context_lens[s])
        if ctx == 0:
            continue
        k, valid = gather_tokens(keys, block_tables[s : s + 1], context_lens[s : s + 1])
        v, _ = gather_tokens(values, block_tables[s : s + 1], context_lens[s : s + 1])
        if key_mean is not None:
            positions = torch.arange(ctx, device=query.device)
            mean = rope_turned(key_mean.to(query.device), rope_inv_freq.to(query.device), positions)  # [L, Hkv, D]
            k = k + (mean * (positions > 0)[:, None, None])[None]
        k = k[0].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v[0].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[s].float(), k) * a.scale
        out[s] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v)
    return out.to(query.dtype)
