"""Paged TurboQuant KV cache and fused decode attention in the rotated domain.

Layout (vLLM-style): the cache is N blocks of B token slots each; a sequence's
token t lives in block ``block_tables[s, t // B]`` at offset ``t % B`` and its
flat slot is ``block * B + offset``. Per slot and KV head the cache stores the
packed codes and the float32 norm of the key and of the value.

Decode attention never leaves the rotated domain until the very end. With
k_t = ||k_t|| Pi^T c_k[idx_k_t] and Pi orthogonal,

    <q, k_t> = ||k_t|| <Pi q, c_k[idx_k_t]>
    sum_t p_t v_t = Pi^T sum_t p_t ||v_t|| c_v[idx_v_t]

so the query is rotated once (q_rot = Pi q), scores are dot products with
centroids, the weighted sum of value centroids is accumulated in rotated
coordinates and rotated back once: out = Pi^T acc.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tq_deploy import backend
from tq_deploy.ops import default_scale, packed_size
from tq_deploy.reference.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bits,
    check_codebook,
    check_head_dim,
    check_rotation,
    check_last_dim,
    check_shape,
    check_tensor,
)
from tq_deploy.reference.packing import unpack_codes
from tq_deploy.reference.quantizer import decode_reference, encode_reference


@dataclass
class PagedTQCache:
    """The four tensors of one layer's TurboQuant paged KV cache."""

    k_codes: torch.Tensor  # [N, B, Hkv, Pk] uint8
    k_norms: torch.Tensor  # [N, B, Hkv] float32
    v_codes: torch.Tensor  # [N, B, Hkv, Pv] uint8
    v_norms: torch.Tensor  # [N, B, Hkv] float32

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
                   k_bits: int, v_bits: int, device=None) -> PagedTQCache:
    """An all-zero cache (zero codes and norms decode to zero vectors)."""
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}, expected an int >= 1")
    check_head_dim("head_dim", head_dim)
    shape = (num_blocks, block_size, num_kv_heads)
    return PagedTQCache(
        torch.zeros(*shape, packed_size(head_dim, check_bits("k_bits", k_bits)), dtype=torch.uint8, device=device),
        torch.zeros(shape, dtype=torch.float32, device=device),
        torch.zeros(*shape, packed_size(head_dim, check_bits("v_bits", v_bits)), dtype=torch.uint8, device=device),
        torch.zeros(shape, dtype=torch.float32, device=device),
    )


def check_cache(k_codes, k_norms, v_codes, v_norms, head_dim: int, k_bits: int, v_bits: int) -> tuple[int, int, int]:
    """Validate the four cache tensors against each other; returns (N, B, Hkv)."""
    check_bits("k_bits", k_bits)
    check_bits("v_bits", v_bits)
    check_tensor("k_codes", k_codes, dtypes=(torch.uint8,), rank=4)
    n, b, hkv, _ = k_codes.shape
    check_shape("k_codes", k_codes, (n, b, hkv, packed_size(head_dim, k_bits)))
    check_tensor("k_norms", k_norms, dtypes=(torch.float32,))
    check_shape("k_norms", k_norms, (n, b, hkv))
    check_tensor("v_codes", v_codes, dtypes=(torch.uint8,))
    check_shape("v_codes", v_codes, (n, b, hkv, packed_size(head_dim, v_bits)))
    check_tensor("v_norms", v_norms, dtypes=(torch.float32,))
    check_shape("v_norms", v_norms, (n, b, hkv))
    return n, b, hkv


def _check_codebooks(rotation, k_codebook, v_codebook, head_dim, k_bits, v_bits) -> None:
    check_rotation("rotation", rotation, head_dim)
    check_codebook("k_codebook", k_codebook, k_bits)
    check_codebook("v_codebook", v_codebook, v_bits)


def cache_update_reference(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                           rotation, k_codebook, v_codebook, k_bits, v_bits):
    """Encode key/value [T, Hkv, D] into their slots, in place; slot < 0 skips a token."""
    check_tensor("key", key, dtypes=FLOAT_DTYPES, rank=3)
    check_last_dim("key", key, rotation)
    t, hkv, dim = key.shape
    check_tensor("value", value, dtypes=FLOAT_DTYPES)
    check_shape("value", value, (t, hkv, dim))
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, rank=1)
    check_shape("slot_mapping", slot_mapping, (t,))
    n, b, cache_hkv = check_cache(k_codes, k_norms, v_codes, v_norms, dim, k_bits, v_bits)
    if cache_hkv != hkv:
        raise ValueError(f"key.shape[1]={hkv}, expected the cache's num_kv_heads={cache_hkv}")
    _check_codebooks(rotation, k_codebook, v_codebook, dim, k_bits, v_bits)
    if t and int(slot_mapping.max()) >= n * b:
        raise ValueError(f"slot_mapping has slot {int(slot_mapping.max())}, expected < num_blocks*block_size = {n * b}")
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kc, kn = encode_reference(key[keep], rotation, k_codebook, k_bits)
    vc, vn = encode_reference(value[keep], rotation, v_codebook, v_bits)
    k_codes.view(n * b, hkv, -1)[slots] = kc
    k_norms.view(n * b, hkv)[slots] = kn
    v_codes.view(n * b, hkv, -1)[slots] = vc
    v_norms.view(n * b, hkv)[slots] = vn
    return k_codes, k_norms, v_codes, v_norms


def _check_attention_args(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                          rotation, k_codebook, v_codebook, k_bits, v_bits) -> tuple[int, int]:
    """Validate everything the attention reads; returns (block_size, group size Hq/Hkv)."""
    check_tensor("query", query, dtypes=FLOAT_DTYPES, rank=3)
    check_last_dim("query", query, rotation)
    s, hq, dim = query.shape
    n, b, hkv = check_cache(k_codes, k_norms, v_codes, v_norms, dim, k_bits, v_bits)
    if hq % hkv:
        raise ValueError(f"query.shape[1]={hq} query heads, expected a multiple of the cache's num_kv_heads={hkv}")
    _check_codebooks(rotation, k_codebook, v_codebook, dim, k_bits, v_bits)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), rank=2)
    check_shape("block_tables", block_tables, (s, None))
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), rank=1)
    check_shape("context_lens", context_lens, (s,))
    capacity = block_tables.shape[1] * b
    if s:
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 0 or hi > capacity:
            bad = lo if lo < 0 else hi
            raise ValueError(f"context_lens has {bad}, expected 0..{capacity} (block_tables.shape[1] * block_size)")
        used = torch.arange(block_tables.shape[1], device=block_tables.device) * b < context_lens[:, None]
        entries = block_tables[used]
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= n):
            bad = int(entries.min()) if int(entries.min()) < 0 else int(entries.max())
            raise ValueError(f"block_tables has entry {bad} in use, expected 0..{n - 1} (num_blocks - 1)")
    return b, hq // hkv


def gather_tokens(cache_tensor: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor):
    """Per-sequence view of a paged tensor: [S, L, ...] with L = max context, plus the valid mask."""
    b = cache_tensor.shape[1]
    length = int(context_lens.max()) if context_lens.numel() else 0
    t = torch.arange(length, device=block_tables.device)
    valid = t[None, :] < context_lens[:, None].long()
    blocks = torch.where(valid, block_tables[:, t // b].long(), 0)
    return cache_tensor[blocks, (t % b)[None, :].expand_as(blocks)], valid


def paged_attention_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                              rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0):
    """Fused decode attention in the rotated domain (module docstring); out[S, Hq, D] in query's dtype."""
    _, group = _check_attention_args(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                     rotation, k_codebook, v_codebook, k_bits, v_bits)
    s, hq, dim = query.shape
    hkv = hq // group
    scale = default_scale(dim, scale)
    q_rot = (query.float() @ rotation.T).reshape(s, hkv, group, dim)
    k_idx, valid = gather_tokens(k_codes, block_tables, context_lens)
    v_idx, _ = gather_tokens(v_codes, block_tables, context_lens)
    # Masked tokens read slot 0 of block 0, which may hold anything (inf, NaN): zero their norms
    # so that 0 * garbage never reaches the sums.
    k_norm = gather_tokens(k_norms, block_tables, context_lens)[0].masked_fill(~valid[..., None], 0.0)
    v_norm = gather_tokens(v_norms, block_tables, context_lens)[0].masked_fill(~valid[..., None], 0.0)
    k_cent = k_codebook[unpack_codes(k_idx, k_bits, dim).long()]  # [S, L, Hkv, D]
    v_cent = v_codebook[unpack_codes(v_idx, v_bits, dim).long()]
    scores = torch.einsum("shgd,slhd->shgl", q_rot, k_cent) * (k_norm.permute(0, 2, 1)[:, :, None, :] * scale)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a context of 0 tokens gives zeros
    weights = probs * v_norm.permute(0, 2, 1)[:, :, None, :]
    acc = torch.einsum("shgl,slhd->shgd", weights, v_cent)
    return (acc.reshape(s, hq, dim) @ rotation).to(query.dtype)


def dense_attention_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                              rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0):
    """The oracle: decode K and V to full vectors, then plain softmax attention per sequence."""
    _, group = _check_attention_args(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                     rotation, k_codebook, v_codebook, k_bits, v_bits)
    dim = query.shape[-1]
    keys = decode_reference(k_codes, k_norms, rotation, k_codebook, k_bits)  # [N, B, Hkv, D]
    values = decode_reference(v_codes, v_norms, rotation, v_codebook, v_bits)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for s in range(query.shape[0]):  # the oracle favours plainness over speed
        ctx = int(context_lens[s])
        if ctx == 0:
            continue
        k, valid = gather_tokens(keys, block_tables[s : s + 1], context_lens[s : s + 1])
        v, _ = gather_tokens(values, block_tables[s : s + 1], context_lens[s : s + 1])
        k = k[0].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v[0].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[s].float(), k) * default_scale(dim, scale)
        out[s] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v)
    return out.to(query.dtype)


def _triton_paged_shapes(query, k_codes) -> bool:
    """The Triton attention takes power-of-two block sizes and query groups of at most 64 heads."""
    if query.dim() != 3 or k_codes.dim() != 4 or k_codes.shape[2] == 0 or query.shape[1] % k_codes.shape[2]:
        return False  # let the reference name what is wrong
    block_size, group = k_codes.shape[1], query.shape[1] // k_codes.shape[2]
    return block_size & (block_size - 1) == 0 and group <= 64


def cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                 rotation, k_codebook, v_codebook, k_bits, v_bits):
    """Encode new K/V into the paged cache in place; Triton on CUDA tensors, the reference elsewhere."""
    if backend.use_triton(key, k_codes, head_dim=key.shape[-1], bits=(k_bits, v_bits)):
        from tq_deploy import triton as tq_triton

        return tq_triton.cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                      rotation, k_codebook, v_codebook, k_bits, v_bits)
    return cache_update_reference(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                  rotation, k_codebook, v_codebook, k_bits, v_bits)


def paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                    rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0):
    """Paged TurboQuant decode attention: on CUDA tensors the tensor-core CUDA kernel where it takes
    the shape, else Triton; the reference elsewhere (see tq_deploy.backend)."""
    if backend.use_cuda_library(query, k_codes):
        from tq_deploy import cuda as tq_cuda

        if tq_cuda.supports_paged_attention(query, k_codes, k_bits, v_bits, v_codes):
            return tq_cuda.paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                           rotation, k_codebook, v_codebook, k_bits, v_bits, scale)
    if _triton_paged_shapes(query, k_codes) and backend.use_triton(query, k_codes, head_dim=query.shape[-1],
                                                                      bits=(k_bits, v_bits)):
        from tq_deploy import triton as tq_triton

        return tq_triton.paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                         rotation, k_codebook, v_codebook, k_bits, v_bits, scale)
    return paged_attention_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                     rotation, k_codebook, v_codebook, k_bits, v_bits, scale)
