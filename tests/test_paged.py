"""Paged TurboQuant cache update and decode attention (issue item 7).

The oracle here is written independently of tq_deploy.reference.paged: it
walks the block table token by token in Python, decodes every cached vector as
norm * (c[idx] @ Pi) and runs torch's scaled_dot_product_attention in float64.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tq_deploy.ops import packed_size
from tq_deploy.reference import paged as paged_module
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.packing import unpack_codes
from tq_deploy.dispatch import cache_update, force_reference, paged_attention
from tq_deploy.reference.paged import (
    allocate_cache,
    cache_update_reference,
    dense_attention_reference,
    paged_attention_reference,
)
from tq_deploy.reference.quantizer import encode_reference
from tq_deploy.reference.rotation import make_rotation

HUGE = 2**31 - 1


@dataclass
class Case:
    query: torch.Tensor
    caches: tuple  # k_codes, k_norms, v_codes, v_norms
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    rotation: torch.Tensor
    k_codebook: torch.Tensor
    v_codebook: torch.Tensor
    k_bits: int
    v_bits: int

    @property
    def block_size(self) -> int:
        return self.caches[0].shape[1]

    def args(self, **override):
        values = dict(query=self.query, block_tables=self.block_tables, context_lens=self.context_lens)
        values.update(override)
        return (values["query"], *self.caches, values["block_tables"], values["context_lens"],
                self.rotation, self.k_codebook, self.v_codebook, self.k_bits, self.v_bits)


def make_case(gen, *, dim, hq, hkv, block_size, ctx_lens, k_bits, v_bits, garbage=-1, spare_blocks=3,
              extra_entries=2, rotation="haar") -> Case:
    """Every slot of the cache holds some encoded vector (so reading a wrong slot shows), the
    sequences get their blocks in a random order, and unused table entries hold ``garbage``."""
    need = [math.ceil(c / block_size) for c in ctx_lens]
    n, m = sum(need) + spare_blocks, max(need + [1]) + extra_entries
    rot = make_rotation(dim, rotation, int(torch.randint(0, 10_000, (1,), generator=gen)))
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    cache = allocate_cache(n, block_size, hkv, dim, k_bits, v_bits)
    slots = n * block_size
    scale = 0.5 + torch.rand(slots, hkv, 1, generator=gen) * 2  # varied norms
    keys = torch.randn(slots, hkv, dim, generator=gen) * scale
    values = torch.randn(slots, hkv, dim, generator=gen) * scale.flip(0)
    cache_update_reference(keys, values, torch.arange(slots), *cache.tensors(), rot, kcb, vcb, k_bits, v_bits)
    order = torch.randperm(n, generator=gen)
    tables = torch.full((len(ctx_lens), m), garbage, dtype=torch.int32)
    start = 0
    for s, k in enumerate(need):
        tables[s, :k] = order[start : start + k].int()
        start += k
    query = torch.randn(len(ctx_lens), hq, dim, generator=gen) * 2
    return Case(query, cache.tensors(), tables, torch.tensor(ctx_lens, dtype=torch.int32), rot, kcb, vcb,
                k_bits, v_bits)


def decode_all(codes, norms, codebook, bits, rotation) -> torch.Tensor:
    """Every cached vector as float64: norm * (c[idx] @ Pi)."""
    dim = rotation.shape[0]
    return norms.double().unsqueeze(-1) * (codebook.double()[unpack_codes(codes, bits, dim).long()] @ rotation.double())


def oracle_over_slots(case: Case, slots_of: list[list[int]], scale: float | None = None) -> torch.Tensor:
    """SDPA in float64 over the given cache slots of every sequence (none: zeros)."""
    k_codes, k_norms, v_codes, v_norms = case.caches
    n, b, hkv, _ = k_codes.shape
    s_count, hq, dim = case.query.shape
    keys = decode_all(k_codes, k_norms, case.k_codebook, case.k_bits, case.rotation).reshape(n * b, hkv, dim)
    values = decode_all(v_codes, v_norms, case.v_codebook, case.v_bits, case.rotation).reshape(n * b, hkv, dim)
    out = torch.zeros(s_count, hq, dim, dtype=torch.float64)
    for s, slots in enumerate(slots_of):
        if not slots:
            continue
        idx = torch.tensor(slots)
        k = keys[idx].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # [Hq, L, D]
        v = values[idx].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        q = case.query[s].double().unsqueeze(1)  # [Hq, 1, D]
        out[s] = F.scaled_dot_product_attention(q, k, v, scale=scale).squeeze(1)
    return out


def sdpa_oracle(case: Case, scale: float | None = None) -> torch.Tensor:
    """The oracle over each sequence's context, slot by slot through its block table."""
    b = case.caches[0].shape[1]
    slots_of = [[int(case.block_tables[s, t // b]) * b + t % b for t in range(int(case.context_lens[s]))]
                for s in range(case.query.shape[0])]
    return oracle_over_slots(case, slots_of, scale)


def assert_close_to(out: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5) -> None:
    """Float tolerance relative to the output's scale."""
    ref = expected.double()
    atol = rel * max(float(ref.abs().max()), 1e-3)
    torch.testing.assert_close(out.double(), ref, rtol=rel, atol=atol)


CASES = {
    # name: dim, hq, hkv, block_size, context lengths, k_bits, v_bits
    "gqa1-d64-b16": (64, 4, 4, 16, [1, 15, 17, 16], 4, 4),
    "gqa4-d128-b32": (128, 8, 2, 32, [31, 33, 1, 300], 3, 2),
    "gqa8-d256-b16-long": (256, 8, 1, 16, [1000, 16, 0, 5], 2, 4),
    "gqa8-d128-b32": (128, 16, 2, 32, [640, 1, 32], 1, 3),
    "gqa4-d64-b16": (64, 8, 2, 16, [17, 16, 15, 1, 400], 4, 1),
    "gqa4-d100-odd": (100, 4, 1, 16, [33, 2], 2, 3),
    "gqa1-d256-b32": (256, 2, 2, 32, [65, 1], 4, 2),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("garbage", [-1, HUGE])
def test_paged_attention_matches_dense_and_sdpa(name, garbage, gen):
    dim, hq, hkv, b, ctx, kb, vb = CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=b, ctx_lens=ctx, k_bits=kb, v_bits=vb, garbage=garbage)
    out = paged_attention_reference(*case.args())
    assert out.shape == case.query.shape and out.dtype == case.query.dtype
    assert_close_to(out, dense_attention_reference(*case.args()), rel=1e-5)
    assert_close_to(out, sdpa_oracle(case))
    assert torch.equal(paged_attention(*case.args()), out)  # CPU tensors dispatch to the reference


def test_custom_scale_and_hadamard_rotation(gen):
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[50, 3], k_bits=3, v_bits=4,
                     rotation="hadamard")
    out = paged_attention_reference(*case.args(), scale=0.37)
    assert_close_to(out, sdpa_oracle(case, scale=0.37))
    assert_close_to(dense_attention_reference(*case.args(), scale=0.37), out, rel=1e-5)
    assert not torch.allclose(out, paged_attention_reference(*case.args()))  # scale=0 means 1/sqrt(D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_query_gives_output_in_its_dtype(dtype, gen):
    case = make_case(gen, dim=64, hq=4, hkv=2, block_size=16, ctx_lens=[20, 1], k_bits=4, v_bits=4)
    q = case.query.to(dtype)
    out = paged_attention_reference(*case.args(query=q))
    assert out.dtype == dtype
    # Computed in float32 from the widened query, then cast once.
    assert torch.equal(out, paged_attention_reference(*case.args(query=q.float())).to(dtype))


def test_context_zero_gives_zeros(gen):
    case = make_case(gen, dim=64, hq=4, hkv=1, block_size=16, ctx_lens=[0, 5, 0], k_bits=2, v_bits=2, garbage=HUGE)
    out = paged_attention_reference(*case.args())
    assert torch.equal(out[[0, 2]], torch.zeros(2, 4, 64))
    assert float(out[1].abs().max()) > 0
    zero = torch.zeros(3, dtype=torch.int32)
    assert torch.equal(paged_attention_reference(*case.args(context_lens=zero)), torch.zeros(3, 4, 64))
    assert torch.equal(dense_attention_reference(*case.args(context_lens=zero)), torch.zeros(3, 4, 64))


def test_unused_table_entries_are_never_read(gen):
    """Replacing every entry past ceil(ctx/B) by anything (-1, huge, other valid blocks) changes nothing."""
    case = make_case(gen, dim=64, hq=8, hkv=2, block_size=16, ctx_lens=[17, 32, 1, 0], k_bits=3, v_bits=2,
                     extra_entries=3)
    out = paged_attention_reference(*case.args())
    b, n = case.block_size, case.caches[0].shape[0]
    used = torch.arange(case.block_tables.shape[1]) * b < case.context_lens[:, None]
    for filler in (torch.full_like(case.block_tables, -7), torch.full_like(case.block_tables, HUGE),
                   torch.randint(0, n, case.block_tables.shape, generator=gen, dtype=torch.int32)):
        tables = torch.where(used, case.block_tables, filler)
        assert torch.equal(paged_attention_reference(*case.args(block_tables=tables)), out)


def test_shuffling_physical_blocks_with_the_table_changes_nothing(gen):
    case = make_case(gen, dim=128, hq=4, hkv=2, block_size=16, ctx_lens=[70, 33, 16], k_bits=4, v_bits=3)
    out = paged_attention_reference(*case.args())
    n = case.caches[0].shape[0]
    perm = torch.randperm(n, generator=gen)  # new block i holds old block perm[i]
    inverse = torch.argsort(perm).int()
    moved = tuple(t[perm] for t in case.caches)
    used = torch.arange(case.block_tables.shape[1]) * case.block_size < case.context_lens[:, None]
    tables = torch.where(used, inverse[case.block_tables.clamp(0, n - 1).long()], case.block_tables)
    shuffled = Case(case.query, moved, tables, case.context_lens, case.rotation, case.k_codebook,
                    case.v_codebook, case.k_bits, case.v_bits)
    assert_close_to(paged_attention_reference(*shuffled.args()), out, rel=1e-6)


def test_slots_past_the_context_in_the_last_block_are_ignored(gen):
    case = make_case(gen, dim=64, hq=2, hkv=2, block_size=16, ctx_lens=[21], k_bits=4, v_bits=4)
    out = paged_attention_reference(*case.args())
    last = int(case.block_tables[0, 1])
    for t in case.caches:
        t[last, 5:] = t[last, 5:].flip(0) * (2 if t.is_floating_point() else 1) + (0 if t.is_floating_point() else 3)
    assert torch.equal(paged_attention_reference(*case.args()), out)
    # ... while changing a slot inside the context does change the output.
    case.caches[1][last, 4] *= 5
    assert not torch.equal(paged_attention_reference(*case.args()), out)


def test_reference_attention_is_vectorized(single_thread):
    """No Python loop over tokens, heads or sequences: S=4, ctx=4096 runs in a few seconds."""
    for fn in (paged_module.paged_attention_reference, paged_module.gather_tokens,
               paged_module.cache_update_reference):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        loops = [type(node).__name__ for node in ast.walk(tree)
                 if isinstance(node, (ast.For, ast.While, ast.comprehension))]
        assert not loops, f"{fn.__name__} has Python loops: {loops}"
    g = torch.Generator().manual_seed(0)
    case = make_case(g, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[4096] * 4, k_bits=4, v_bits=4)
    start = time.perf_counter()
    out = paged_attention_reference(*case.args())
    elapsed = time.perf_counter() - start
    assert out.shape == (4, 8, 128)
    assert elapsed < 60, f"{elapsed:.1f} s for 4 x 4096 tokens: is there a loop over tokens?"


# ---------------------------------------------------------------- cache update


def random_cache(gen, n, b, hkv, dim, k_bits, v_bits):
    """Garbage in every slot, so that a stray write or a skipped write is visible."""
    pk, pv = packed_size(dim, k_bits), packed_size(dim, v_bits)
    return (torch.randint(0, 256, (n, b, hkv, pk), generator=gen, dtype=torch.int32).to(torch.uint8),
            torch.rand(n, b, hkv, generator=gen) + 0.1,
            torch.randint(0, 256, (n, b, hkv, pv), generator=gen, dtype=torch.int32).to(torch.uint8),
            torch.rand(n, b, hkv, generator=gen) + 0.1)


UPDATE_CASES = [  # dim, hkv, block_size, k_bits, v_bits, dtype, slot dtype
    (64, 1, 16, 4, 4, torch.float32, torch.int64),
    (128, 2, 32, 3, 2, torch.float16, torch.int64),
    (256, 4, 16, 1, 4, torch.bfloat16, torch.int32),
    (100, 2, 16, 2, 3, torch.float32, torch.int32),
]


@pytest.mark.parametrize("dim,hkv,b,k_bits,v_bits,dtype,slot_dtype", UPDATE_CASES)
def test_cache_update_writes_exactly_the_mapped_slots(dim, hkv, b, k_bits, v_bits, dtype, slot_dtype, gen):
    n, t = 6, 40
    rot = make_rotation(dim, "haar", 5)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    caches = random_cache(gen, n, b, hkv, dim, k_bits, v_bits)
    before = tuple(c.clone() for c in caches)
    key = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    value = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    slots = torch.randperm(n * b, generator=gen)[:t]
    slots[::5] = -1  # padding tokens
    slots[3] = -9
    out = cache_update_reference(key, value, slots.to(slot_dtype), *caches, rot, kcb, vcb, k_bits, v_bits)
    assert all(o.data_ptr() == c.data_ptr() for o, c in zip(out, caches))  # in place
    k_codes, v_codes = (c.reshape(n * b, hkv, -1) for c in caches[0::2])  # flat slot views
    k_norms, v_norms = (c.reshape(n * b, hkv) for c in caches[1::2])
    written = set()
    for i in range(t):
        slot = int(slots[i])
        if slot < 0:
            continue
        written.add(slot)
        kc, kn = encode_reference(key[i], rot, kcb, k_bits)
        vc, vn = encode_reference(value[i], rot, vcb, v_bits)
        assert torch.equal(k_codes[slot], kc) and torch.equal(k_norms[slot], kn)
        assert torch.equal(v_codes[slot], vc) and torch.equal(v_norms[slot], vn)
        # The slot decodes to the quantized vector.
        decoded = decode_all(k_codes[slot], k_norms[slot], kcb, k_bits, rot)
        assert float((decoded - key[i].double()).norm() / key[i].double().norm()) < 1.0
    untouched = torch.tensor([s not in written for s in range(n * b)])
    for now, old in zip(caches, before):
        flat_now, flat_old = now.reshape(n * b, -1), old.reshape(n * b, -1)
        assert torch.equal(flat_now[untouched], flat_old[untouched])
    assert len(written) == sum(1 for s in slots.tolist() if s >= 0)


def test_cache_update_all_skipped_or_empty_changes_nothing(gen):
    dim, hkv, b = 64, 2, 16
    rot, cb = make_rotation(dim), lloyd_max_codebook(dim, 2)
    caches = random_cache(gen, 3, b, hkv, dim, 2, 2)
    before = tuple(c.clone() for c in caches)
    key = torch.randn(4, hkv, dim, generator=gen)
    cache_update_reference(key, key, torch.full((4,), -1), *caches, rot, cb, cb, 2, 2)
    cache_update_reference(key[:0], key[:0], torch.zeros(0, dtype=torch.int64), *caches, rot, cb, cb, 2, 2)
    assert all(torch.equal(a, c) for a, c in zip(caches, before))


def test_dispatching_cache_update_equals_reference_on_cpu(gen):
    dim, hkv, b = 128, 2, 16
    rot, kcb, vcb = make_rotation(dim), lloyd_max_codebook(dim, 4), lloyd_max_codebook(dim, 3)
    a = random_cache(gen, 4, b, hkv, dim, 4, 3)
    c = tuple(t.clone() for t in a)
    key, value = torch.randn(2, 10, hkv, dim, generator=gen)
    slots = torch.randperm(4 * b, generator=gen)[:10]
    cache_update(key, value, slots, *a, rot, kcb, vcb, 4, 3)
    cache_update_reference(key, value, slots, *c, rot, kcb, vcb, 4, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_update_then_attend_sees_the_new_token(gen):
    """A new token written by cache_update is the one attention reads at position ctx - 1."""
    case = make_case(gen, dim=64, hq=4, hkv=2, block_size=16, ctx_lens=[16, 9], k_bits=4, v_bits=4)
    b = case.block_size
    slot = [int(case.block_tables[s, (c - 1) // b]) * b + (c - 1) % b for s, c in enumerate(case.context_lens.tolist())]
    key = torch.randn(2, 2, 64, generator=gen) * 30  # a dominant key
    value = torch.randn(2, 2, 64, generator=gen)
    cache_update_reference(key, value, torch.tensor(slot), *case.caches, case.rotation, case.k_codebook,
                           case.v_codebook, 4, 4)
    assert_close_to(paged_attention_reference(*case.args()), sdpa_oracle(case))


def test_allocate_cache_shapes():
    cache = allocate_cache(5, 16, 2, 100, 3, 1)
    assert cache.k_codes.shape == (5, 16, 2, 38) and cache.v_codes.shape == (5, 16, 2, 13)
    assert cache.k_norms.shape == cache.v_norms.shape == (5, 16, 2)
    assert cache.k_codes.dtype == torch.uint8 and cache.k_norms.dtype == torch.float32
    assert (cache.num_blocks, cache.block_size) == (5, 16)
    assert cache.nbytes() == 5 * 16 * 2 * (38 + 13 + 8)
    assert all(int(t.abs().sum()) == 0 for t in cache.tensors())


@pytest.mark.gpu
def test_reference_attention_on_cuda_matches_cpu(gen):
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[100, 1, 17], k_bits=3, v_bits=4)
    cpu = paged_attention_reference(*case.args())
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case.args()]
    with force_reference():
        out = paged_attention(*args)
    assert out.is_cuda
    assert_close_to(out.cpu(), cpu, rel=1e-4)


def test_attention_ignores_non_finite_garbage_in_slots_it_must_not_read(gen):
    """Masked tokens gather slot 0 of block 0; inf/NaN norms there must not leak into the output."""
    from tq_deploy.reference import TurboQuantMSE, allocate_cache, paged_attention_reference

    q = TurboQuantMSE(64, 4)
    cache = allocate_cache(4, 8, 2, 64, 4, 4)
    cache.k_norms.uniform_(0.5, 2.0, generator=gen)
    cache.v_norms.uniform_(0.5, 2.0, generator=gen)
    cache.k_codes.random_(0, 256, generator=gen)
    cache.v_codes.random_(0, 256, generator=gen)
    cache.k_norms[0], cache.v_norms[0] = float("inf"), float("nan")  # block 0 is never in use below
    tables = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    ctx = torch.tensor([11, 5], dtype=torch.int32)
    out = paged_attention_reference(torch.randn(2, 4, 64, generator=gen), *cache.tensors(), tables, ctx,
                                    q.rotation, q.codebook, q.codebook, 4, 4)
    assert torch.isfinite(out).all()
