"""Argument checks of every op, run once per call, by the reference and by the dispatcher.

Every failure is a ValueError that names the argument, the value seen and the
value expected, so that a bad call never turns into a silent wrong answer.

``check_encode``, ``check_decode``, ``check_cache_update`` and
``check_paged_attention`` check one call's metadata (types, ranks, shapes,
devices, attributes) and return its arguments as one object with the sizes
derived from them (:class:`EncodeArgs`, ...): the reference bodies and every
backend take that object and check nothing again. Data checks (context
lengths, block-table entries, slots, codebook values) read tensor values: on a
CUDA device that is a host synchronization, so the fast GPU backends skip them
and their kernels never read out of bounds instead (docs/ops.md, "Bad input").
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from tq_deploy.ops import SUPPORTED_BITS, default_scale, packed_size

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes int64; a layer's seed is seed + layer


def check_seed(name: str, seed: int) -> int:
    """A rotation seed: an int in [0, 2**63); a float would be truncated (1.7 -> 1) into another matrix."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name}={seed!r}, expected an int in [0, 2**63)")
    return int(seed)


def check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"{name}={bits!r}, expected one of {SUPPORTED_BITS}")
    return int(bits)


def check_head_dim(name: str, dim: int, minimum: int = 2) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < minimum:
        raise ValueError(f"{name}={dim!r}, expected an int >= {minimum}")
    return int(dim)


def check_tensor(name: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
                 rank: int | None = None, min_rank: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} is a {type(value).__name__}, expected a torch.Tensor")
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name}.dtype={value.dtype}, expected one of {tuple(str(d) for d in dtypes)}")
    if rank is not None and value.dim() != rank:
        raise ValueError(f"{name} has rank {value.dim()} (shape {tuple(value.shape)}), expected rank {rank}")
    if min_rank is not None and value.dim() < min_rank:
        raise ValueError(f"{name} has rank {value.dim()} (shape {tuple(value.shape)}), expected rank >= {min_rank}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data), expected a CPU or CUDA tensor")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int | None]) -> torch.Tensor:
    """Check ``value.shape`` against ``expected``; None matches any size."""
    shape = tuple(value.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        parts = ["*" if e is None else str(e) for e in expected]
        shown = f"({parts[0]},)" if len(parts) == 1 else "(" + ", ".join(parts) + ")"
        raise ValueError(f"{name}.shape={shape}, expected {shown}")
    return value


def check_codebook(name: str, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    check_tensor(name, codebook, dtypes=(torch.float32,), rank=1)
    if codebook.numel() != 2**bits:
        raise ValueError(f"{name} has {codebook.numel()} entries, expected 2**bits = {2**bits}")
    return codebook


def check_rotation(name: str, rotation: torch.Tensor, dim: int) -> torch.Tensor:
    check_tensor(name, rotation, dtypes=(torch.float32,), rank=2)
    return check_shape(name, rotation, (dim, dim))


def check_last_dim(name: str, value: torch.Tensor, rotation: torch.Tensor) -> int:
    """The vectors' dimension must be the rotation's: names both sizes."""
    check_tensor("rotation", rotation, dtypes=(torch.float32,), rank=2)
    dim = rotation.shape[0]
    if value.shape[-1] != dim:
        seen = value.shape[-1]
        raise ValueError(f"{name}.shape[-1]={seen} but rotation.shape={tuple(rotation.shape)}: expected "
                         f"head_dim={dim} (or the rotation expected ({seen}, {seen}))")
    return dim


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Every data tensor of a call lives on one device (rotation and codebooks may live anywhere)."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, expected {first.device} like {first_name}")
    return first.device


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: a finite number >= 0, 0 meaning 1/sqrt(head_dim); returns the scale used."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale={scale!r}, expected a finite number >= 0 (0 means 1/sqrt(head_dim))")
    return default_scale(head_dim, float(scale))


# Codebook values are checked once per tensor (and version): on a GPU the check copies them to the host.
_checked_codebooks: dict[int, tuple[weakref.ref, int]] = {}


def check_codebook_values(name: str, codebook: torch.Tensor) -> None:
    """Finite and strictly ascending (the boundaries are midpoints of neighbours)."""
    key = id(codebook)
    seen = _checked_codebooks.get(key)
    if seen is not None and seen[0]() is codebook and seen[1] == codebook._version:
        return
    values = codebook.detach().cpu()
    if not bool(torch.isfinite(values).all()) or bool((values[1:] <= values[:-1]).any()):
        raise ValueError(f"{name}={values.tolist()}, expected finite, strictly ascending centroids")
    if len(_checked_codebooks) > 256:
        _checked_codebooks.clear()
    _checked_codebooks[key] = (weakref.ref(codebook), codebook._version)


# ---------------------------------------------------------------------------- checked calls


@dataclass(frozen=True, eq=False)
class EncodeArgs:
    x: torch.Tensor  # [..., D]
    rotation: torch.Tensor
    codebook: torch.Tensor
    bits: int
    head_dim: int

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass(frozen=True, eq=False)
class DecodeArgs:
    codes: torch.Tensor  # [..., P]
    norms: torch.Tensor  # [...]
    rotation: torch.Tensor
    codebook: torch.Tensor
    bits: int
    head_dim: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device


@dataclass(frozen=True, eq=False)
class CacheUpdateArgs:
    key: torch.Tensor  # [T, Hkv, D]
    value: torch.Tensor
    slot_mapping: torch.Tensor  # [T]
    k_codes: torch.Tensor  # [N, B, Hkv, Pk]
    k_norms: torch.Tensor
    v_codes: torch.Tensor
    v_norms: torch.Tensor
    rotation: torch.Tensor
    k_codebook: torch.Tensor
    v_codebook: torch.Tensor
    k_bits: int
    v_bits: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int

    @property
    def device(self) -> torch.device:
        return self.key.device


@dataclass(frozen=True, eq=False)
class PagedAttentionArgs:
    query: torch.Tensor  # [S, Hq, D]
    k_codes: torch.Tensor  # [N, B, Hkv, Pk]
    k_norms: torch.Tensor
    v_codes: torch.Tensor
    v_norms: torch.Tensor
    block_tables: torch.Tensor  # [S, M] int32
    context_lens: torch.Tensor  # [S] int32
    rotation: torch.Tensor
    k_codebook: torch.Tensor
    v_codebook: torch.Tensor
    k_bits: int
    v_bits: int
    scale: float  # resolved: > 0
    num_seqs: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int
    key_mean: torch.Tensor | None = None  # [Hkv, D] float32, with rope_inv_freq (ops.py: the key mean)
    rope_inv_freq: torch.Tensor | None = None  # [D / 2] float32

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def device(self) -> torch.device:
        return self.query.device


@dataclass(frozen=True, eq=False)
class PagedPrefillArgs:
    """A prefill-attention call: the decode call's arguments with T query rows instead of S, plus query_start."""

    attention: PagedAttentionArgs  # query [T, Hq, D]; block_tables / context_lens per sequence [S]
    query_start: torch.Tensor  # [S + 1] int32
    num_tokens: int  # T

    @property
    def device(self) -> torch.device:
        return self.attention.device


def check_encode(x, rotation, codebook, bits, *, check_data: bool = True) -> EncodeArgs:
    bits = check_bits("bits", bits)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
    dim = x.shape[-1]
    check_rotation("rotation", rotation, dim)
    check_codebook("codebook", codebook, bits)
    if check_data:
        check_codebook_values("codebook", codebook)
    return EncodeArgs(x, rotation, codebook, bits, dim)


def check_codec_data(a: EncodeArgs | DecodeArgs) -> None:
    check_codebook_values("codebook", a.codebook)


def check_decode(codes, norms, rotation, codebook, bits, dtype=torch.float32, *, check_data: bool = True) -> DecodeArgs:
    bits = check_bits("bits", bits)
    check_tensor("codes", codes, dtypes=(torch.uint8,), min_rank=1)
    check_tensor("norms", norms, dtypes=(torch.float32,))
    check_tensor("rotation", rotation, dtypes=(torch.float32,), rank=2)
    dim = rotation.shape[0]
    check_rotation("rotation", rotation, dim)
    check_codebook("codebook", codebook, bits)
    check_shape("codes", codes, (*norms.shape, packed_size(dim, bits)))
    check_same_device(codes=codes, norms=norms)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype}, expected one of {tuple(str(d) for d in FLOAT_DTYPES)}")
    if check_data:
        check_codebook_values("codebook", codebook)
    return DecodeArgs(codes, norms, rotation, codebook, bits, dim, dtype)


# A paged cache stores its norms as float32 or float16 (ops.py: type parameter TN), keys and values alike.
NORM_DTYPES = (torch.float32, torch.float16)


def check_cache(k_codes, k_norms, v_codes, v_norms, head_dim: int, k_bits: int, v_bits: int) -> tuple[int, int, int]:
    """Validate the four cache tensors against each other; returns (N, B, Hkv)."""
    check_bits("k_bits", k_bits)
    check_bits("v_bits", v_bits)
    check_tensor("k_codes", k_codes, dtypes=(torch.uint8,), rank=4)
    n, b, hkv, _ = k_codes.shape
    check_shape("k_codes", k_codes, (n, b, hkv, packed_size(head_dim, k_bits)))
    check_tensor("k_norms", k_norms, dtypes=NORM_DTYPES)
    check_shape("k_norms", k_norms, (n, b, hkv))
    check_tensor("v_codes", v_codes, dtypes=(torch.uint8,))
    check_shape("v_codes", v_codes, (n, b, hkv, packed_size(head_dim, v_bits)))
    check_tensor("v_norms", v_norms, dtypes=NORM_DTYPES)
    if v_norms.dtype != k_norms.dtype:
        raise ValueError(f"v_norms.dtype={v_norms.dtype}, expected {k_norms.dtype} like k_norms (one norm type per "
                         "cache)")
    check_shape("v_norms", v_norms, (n, b, hkv))
    for name, size in (("num_blocks", n), ("block_size", b), ("num_kv_heads", hkv)):
        if size < 1:
            raise ValueError(f"k_codes.shape={tuple(k_codes.shape)} has {name}={size}, expected >= 1")
    return n, b, hkv


def _check_codebooks(rotation, k_codebook, v_codebook, head_dim, k_bits, v_bits) -> None:
    check_rotation("rotation", rotation, head_dim)
    check_codebook("k_codebook", k_codebook, k_bits)
    check_codebook("v_codebook", v_codebook, v_bits)


def check_cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation, k_codebook,
                       v_codebook, k_bits, v_bits, *, check_data: bool = True) -> CacheUpdateArgs:
    """Checks of one cache update; with ``check_data`` also that every slot is < N * B."""
    check_tensor("key", key, dtypes=FLOAT_DTYPES, rank=3)
    check_last_dim("key", key, rotation)
    t, hkv, dim = key.shape
    check_tensor("value", value, dtypes=FLOAT_DTYPES)
    check_shape("value", value, (t, hkv, dim))
    if value.dtype != key.dtype:
        raise ValueError(f"value.dtype={value.dtype}, expected key's dtype {key.dtype}")
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, rank=1)
    check_shape("slot_mapping", slot_mapping, (t,))
    n, b, cache_hkv = check_cache(k_codes, k_norms, v_codes, v_norms, dim, k_bits, v_bits)
    if cache_hkv != hkv:
        raise ValueError(f"key.shape[1]={hkv}, expected the cache's num_kv_heads={cache_hkv}")
    _check_codebooks(rotation, k_codebook, v_codebook, dim, k_bits, v_bits)
    check_same_device(key=key, value=value, slot_mapping=slot_mapping, k_codes=k_codes, k_norms=k_norms,
                      v_codes=v_codes, v_norms=v_norms)
    args = CacheUpdateArgs(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation, k_codebook,
                           v_codebook, int(k_bits), int(v_bits), t, hkv, dim, n, b)
    if check_data:
        check_cache_update_data(args)
    return args


def check_cache_update_data(a: CacheUpdateArgs) -> None:
    """The value checks of a cache update: codebooks, and every slot < N * B."""
    check_codebook_values("k_codebook", a.k_codebook)
    check_codebook_values("v_codebook", a.v_codebook)
    if a.num_tokens:
        check_slots(a.slot_mapping, a.num_blocks * a.block_size)


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every slot < num_slots (negative slots skip their token; a slot named twice keeps the last token)."""
    hi = int(slot_mapping.max())
    if hi >= num_slots:
        raise ValueError(f"slot_mapping has slot {hi}, expected < num_blocks*block_size = {num_slots}")


def check_key_mean(key_mean, rope_inv_freq, num_kv_heads: int, head_dim: int) -> None:
    """Both or neither; key_mean float32 [Hkv, D] and rope_inv_freq float32 [D / 2] with D even."""
    if (key_mean is None) != (rope_inv_freq is None):
        given, missing = ("key_mean", "rope_inv_freq") if rope_inv_freq is None else ("rope_inv_freq", "key_mean")
        raise ValueError(f"{given} is given and {missing} is None, expected both or neither")
    if key_mean is None:
        return
    check_tensor("key_mean", key_mean, dtypes=(torch.float32,), rank=2)
    check_shape("key_mean", key_mean, (num_kv_heads, head_dim))
    check_tensor("rope_inv_freq", rope_inv_freq, dtypes=(torch.float32,), rank=1)
    if head_dim % 2:
        raise ValueError(f"rope_inv_freq is given with head_dim={head_dim}, expected an even head_dim (RoPE pairs)")
    check_shape("rope_inv_freq", rope_inv_freq, (head_dim // 2,))


def check_key_mean_values(key_mean, rope_inv_freq) -> None:
    for name, value in (("key_mean", key_mean), ("rope_inv_freq", rope_inv_freq)):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} holds a non-finite value, expected finite float32 values")


def check_paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                          k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None, rope_inv_freq=None, *,
                          check_data: bool = True) -> PagedAttentionArgs:
    """Checks of one decode-attention call; with ``check_data`` also the context lengths and the
    block-table entries in use."""
    check_tensor("query", query, dtypes=FLOAT_DTYPES, rank=3)
    check_last_dim("query", query, rotation)
    s, hq, dim = query.shape
    n, b, hkv = check_cache(k_codes, k_norms, v_codes, v_norms, dim, k_bits, v_bits)
    if hq < 1 or hq % hkv:
        raise ValueError(f"query.shape[1]={hq} query heads, expected a multiple of the cache's num_kv_heads={hkv}")
    _check_codebooks(rotation, k_codebook, v_codebook, dim, k_bits, v_bits)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), rank=2)
    check_shape("block_tables", block_tables, (s, None))
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), rank=1)
    check_shape("context_lens", context_lens, (s,))
    check_same_device(query=query, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms,
                      block_tables=block_tables, context_lens=context_lens)
    scale = check_scale(scale, dim)
    check_key_mean(key_mean, rope_inv_freq, hkv, dim)
    args = PagedAttentionArgs(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                              k_codebook, v_codebook, int(k_bits), int(v_bits), scale, s, hq, hkv, dim, n, b,
                              block_tables.shape[1], key_mean, rope_inv_freq)
    if check_data:
        check_paged_attention_data(args)
    return args


def check_paged_attention_data(a: PagedAttentionArgs) -> None:
    """The value checks of a decode-attention call: codebooks, context lengths, block-table entries in use."""
    check_codebook_values("k_codebook", a.k_codebook)
    check_codebook_values("v_codebook", a.v_codebook)
    check_key_mean_values(a.key_mean, a.rope_inv_freq)
    if a.num_seqs:
        check_block_tables(a.block_tables, a.context_lens, a.num_blocks, a.block_size)


def check_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                       block_size: int) -> None:
    """context_lens in [0, M * B]; the entries a context uses (the first ceil(ctx / B)) in [0, N)."""
    capacity = block_tables.shape[1] * block_size
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 0 or hi > capacity:
        bad = lo if lo < 0 else hi
        raise ValueError(f"context_lens has {bad}, expected 0..{capacity} (block_tables.shape[1] * block_size)")
    used = torch.arange(block_tables.shape[1], device=block_tables.device) * block_size < context_lens[:, None]
    entries = block_tables[used]
    if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= num_blocks):
        bad = int(entries.min()) if int(entries.min()) < 0 else int(entries.max())
        raise ValueError(f"block_tables has entry {bad} in use, expected 0..{num_blocks - 1} (num_blocks - 1)")


def check_paged_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start,
                        rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None,
                        rope_inv_freq=None, *,
                        check_data: bool = True) -> PagedPrefillArgs:
    """Checks of one prefill-attention call (TQPagedPrefill); with ``check_data`` also query_start against
    the context lengths, the context lengths and the block-table entries in use."""
    check_tensor("query", query, dtypes=FLOAT_DTYPES, rank=3)
    t = query.shape[0]
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), rank=2)
    s = block_tables.shape[0]
    check_tensor("query_start", query_start, dtypes=(torch.int32,), rank=1)
    check_shape("query_start", query_start, (s + 1,))
    check_same_device(query=query, query_start=query_start)
    # The per-sequence checks are the decode call's, with the sequences' first query rows standing in
    # for the query (same head count, dim and dtype): one place for them.
    stand_in = query.new_empty((s, *query.shape[1:])) if t != s else query
    attention = check_paged_attention(stand_in, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                      rotation, k_codebook, v_codebook, k_bits, v_bits, scale, key_mean,
                                      rope_inv_freq, check_data=False)
    args = PagedPrefillArgs(replace(attention, query=query), query_start, t)
    if check_data:
        check_paged_prefill_data(args)
    return args


def check_paged_prefill_data(a: PagedPrefillArgs) -> None:
    """The value checks of a prefill call: the decode call's, and query_start non-decreasing from 0 to T
    with at most context_lens[s] rows per sequence."""
    check_paged_attention_data(a.attention)
    starts = a.query_start.long()
    if int(starts[0]) != 0 or int(starts[-1]) != a.num_tokens:
        raise ValueError(f"query_start runs from {int(starts[0])} to {int(starts[-1])}, expected 0 to "
                         f"T = query.shape[0] = {a.num_tokens}")
    counts = starts[1:] - starts[:-1]
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"query_start decreases ({starts.tolist()[:8]}...), expected non-decreasing row offsets")
    over = counts > a.attention.context_lens.long()
    if bool(over.any()):
        s = int(over.nonzero()[0, 0])
        raise ValueError(f"sequence {s} has {int(counts[s])} query rows (query_start), expected <= "
                         f"context_lens[{s}] = {int(a.attention.context_lens[s])}")
