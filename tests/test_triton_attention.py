"""Triton paged decode attention against the PyTorch reference.

Without CUDA the kernels run under the Triton interpreter on CPU tensors
(small contexts); with CUDA the same cases run compiled, plus larger ones
marked gpu. Odd shapes: context 0, 1, B-1, B+1, partial last blocks, shuffled
block tables, GQA 1/2/4/6/8, D 64/128/256, block size 16/32/64, bits 1-8 with
k_bits != v_bits, garbage in unused blocks, forced split counts (split-K with
the reduction kernels) and the fused single-split path. The control flow the
small CPU shapes would never reach (one split over several tiles, more splits
than the per-group reduction takes, a last split with live tokens, a block table
that is a strided view, value norms past fp16's range) is forced through the
kernel's knobs and checked on its own. The key-mean inputs (key_mean, rope_inv_freq:
q . R_t mu added to the scores of positions t >= 1) run on their own cases, with means up to
|mu| ~ 5 and angles t * w of thousands of radians. A few cases run over float16 cache norms, whose
output must also equal, bit for bit, that of the same norms in float32. Inputs are fresh
random draws (the ``seed`` fixture of tests/conftest.py prints the seed of a
failure).

Tolerance (norm-wise relative error of the output against the reference,
computed in float32): 5e-3 for fp16/fp32 queries, 1.5e-2 for bf16 (the kernel
computes scores and P.V with fp16 operands and fp32 accumulation; bf16 output
rounding alone is ~2e-3).
"""

import math

import pytest
import torch

pytest.importorskip("triton")  # interpreted without CUDA: tests/conftest.py sets TRITON_INTERPRET

from tq_deploy.triton.interpret import load_kernels  # noqa: E402

try:
    tqt = load_kernels()
except RuntimeError as exc:  # triton already imported in compiled mode by an earlier module
    pytest.skip(str(exc), allow_module_level=True)

from tq_deploy.reference import checks, lloyd_max_codebook, make_rotation  # noqa: E402
from tq_deploy.reference.paged import (  # noqa: E402
    allocate_cache,
    cache_update_reference,
    dense_attention_reference,
    paged_attention_reference,
    rope_turned,
)
from tq_deploy.reference.quantizer import decode_reference  # noqa: E402
from key_mean_support import draw_key_mean, relative_error  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TOL = {torch.float16: 5e-3, torch.float32: 5e-3, torch.bfloat16: 1.5e-2}


def make_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed, extra_blocks=3, key_fn=None, query_fn=None,
              value_fn=None, norm_dtype=torch.float32):
    """Random cache (norms in ``norm_dtype``) filled through the reference cache update, shuffled block
    tables. ``key_fn(key [c, Hkv, D], generator)``, ``value_fn`` (the same for values) and
    ``query_fn(query [S, Hq, D], generator)`` may reshape the random keys, values and queries
    (fp32, before the query is cast to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    rot = make_rotation(dim, "haar", seed=seed)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    s = len(ctxs)
    m = max(1, max(math.ceil(c / page) for c in ctxs)) + 1  # one spare column of garbage entries
    n = s * m + extra_blocks
    cache = allocate_cache(n, page, hkv, dim, k_bits, v_bits, norm_dtype=norm_dtype)
    # garbage everywhere first: unused slots must not leak into the result
    cache.k_codes.copy_(torch.randint(0, 256, cache.k_codes.shape, generator=g, dtype=torch.uint8))
    cache.v_codes.copy_(torch.randint(0, 256, cache.v_codes.shape, generator=g, dtype=torch.uint8))
    # (finite garbage: the reference multiplies masked probabilities by these norms)
    cache.k_norms.copy_(torch.rand(cache.k_norms.shape, generator=g) * 1e4)
    cache.v_norms.copy_(torch.rand(cache.v_norms.shape, generator=g) * 1e4)
    tables = torch.randperm(n, generator=g)[: s * m].reshape(s, m).int()
    for i, c in enumerate(ctxs):
        t = torch.arange(c)
        slots = tables[i, t // page].long() * page + t % page
        key = torch.randn(c, hkv, dim, generator=g) * 2
        if key_fn is not None:
            key = key_fn(key, g)
        value = torch.randn(c, hkv, dim, generator=g)
        if value_fn is not None:
            value = value_fn(value, g)
        cache_update_reference(key, value, slots, *cache.tensors(), rot, kcb, vcb, k_bits, v_bits)
    tables[:, -1] = 10**6  # entries past the context are never read
    query = torch.randn(s, hkv * group, dim, generator=g)
    if query_fn is not None:
        query = query_fn(query, g)
    query = query.to(dtype)
    ctx = torch.tensor(ctxs, dtype=torch.int32)
    return query, cache, tables, ctx, rot, kcb, vcb


def attention(*args, **knobs):
    """The Triton paged attention on checked arguments (the dispatcher's route, without the dispatch)."""
    return tqt.paged_attention.paged_attention(checks.check_paged_attention(*args, check_data=False), **knobs)


def run_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed, num_splits=None, scale=0.0, block_n=None,
             key_fn=None, query_fn=None, table_fn=None, value_fn=None, norm_dtype=torch.float32):
    """The Triton attention against the reference on one random case; ``table_fn(tables, num_blocks,
    generator)`` may hand the kernel another view of the same block-table entries."""
    query, cache, tables, ctx, rot, kcb, vcb = make_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed,
                                                         key_fn=key_fn, query_fn=query_fn, value_fn=value_fn,
                                                         norm_dtype=norm_dtype)
    want = paged_attention_reference(query, *cache.tensors(), tables, ctx, rot, kcb, vcb, k_bits, v_bits, scale)
    if table_fn is not None:
        tables = table_fn(tables, cache.num_blocks, torch.Generator().manual_seed(seed))
    dev = [x.to(DEV) for x in (query, *cache.tensors(), tables, ctx, rot, kcb, vcb)]
    got = attention(*dev, k_bits, v_bits, scale, num_splits=num_splits, block_n=block_n)
    assert got.dtype == query.dtype and got.shape == query.shape
    assert_same_with_float32_norms(got, dev, k_bits, v_bits, scale, num_splits=num_splits, block_n=block_n)
    got = got.cpu().float()
    assert torch.isfinite(got).all()
    want = want.float()
    zero = ctx == 0
    assert (got[zero] == 0).all(), "a context of 0 tokens gives zeros"
    err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]}"
    return got


def assert_same_with_float32_norms(got, dev_args, *rest, **knobs):
    """With float16 cache norms, the output must be the one of the same cache with its norms widened
    to float32, bit for bit: the kernel widens them on load (exact) and computes as before."""
    query, k_codes, k_norms, v_codes, v_norms, *tail = dev_args
    if k_norms.dtype == torch.float16:
        wide = attention(query, k_codes, k_norms.float(), v_codes, v_norms.float(), *tail, *rest, **knobs)
        assert torch.equal(got, wide), "float16 norms must give the output of the same norms in float32"


CASES = [
    # ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, num_splits
    ([1, 15, 17], 2, 4, 64, 16, 4, 4, torch.float16, None),
    ([0, 33, 31], 2, 1, 64, 16, 2, 3, torch.float16, 2),
    ([40], 1, 8, 128, 32, 3, 3, torch.bfloat16, None),
    ([65, 32], 1, 4, 128, 32, 4, 2, torch.float32, 3),
    ([20], 1, 2, 256, 16, 1, 4, torch.float16, 2),
    ([16, 50], 2, 4, 64, 16, 3, 4, torch.bfloat16, 4),
    ([100], 1, 8, 64, 16, 2, 2, torch.float16, 7),
    ([3, 47], 2, 4, 128, 16, 4, 4, torch.bfloat16, None),
    # 5-8 bits (5, 6, 7 straddle bytes; 8 is a byte a code), each width as key and as value
    ([0, 1, 33], 2, 4, 64, 16, 5, 7, torch.float16, None),
    ([17], 1, 6, 128, 32, 6, 6, torch.bfloat16, None),
    ([64, 2], 1, 1, 64, 64, 8, 5, torch.float32, 2),
    ([9], 1, 8, 256, 16, 7, 8, torch.float16, None),
    ([40, 31], 2, 2, 128, 16, 8, 3, torch.float16, 3),
    ([15], 2, 4, 64, 32, 2, 6, torch.bfloat16, None),
]


@pytest.mark.parametrize("ctxs,hkv,group,dim,page,k_bits,v_bits,dtype,splits", CASES)
def test_paged_attention_matches_reference(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, splits, seed):
    run_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed=seed, num_splits=splits)


# GQA, k_bits != v_bits, split-K; float16 and bfloat16 queries
FLOAT16_NORM_CASES = [CASES[5], CASES[8]]


@pytest.mark.parametrize("ctxs,hkv,group,dim,page,k_bits,v_bits,dtype,splits", FLOAT16_NORM_CASES)
def test_float16_norms_match_reference(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, splits, seed):
    """A cache whose norms are float16 (the reference cache update rounds them)."""
    run_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed=seed, num_splits=splits,
             norm_dtype=torch.float16)


def _rising_keys(key, g):
    """Key norms grow along the context, so each new tile raises the running max of the scores."""
    ramp = torch.linspace(1.0, 4.0, key.shape[0])
    return key * ramp[:, None, None]


def test_one_split_over_many_tiles(seed):
    """A split of several BLOCK_N tiles: the online softmax must rescale what earlier tiles summed
    whenever a later tile raises the max (the CPU shapes are otherwise one tile per split)."""
    for splits in (1, 2):
        run_case([70, 40], 2, 2, 64, 16, 4, 3, torch.float16, seed=seed, num_splits=splits, block_n=16,
                 key_fn=_rising_keys)


@pytest.mark.parametrize("splits", [3, 8])
def test_split_merge_rescales_to_the_max(splits, seed):
    """Splits merged with weights 2^(m_split - m_max). Keys are 20 u + noise and queries 83 u +
    noise along one direction u per KV head, so every score is about 300 (base 2) and spreads
    by a few units: 2^m overflows float32, so the max cannot be left out, and the splits' maxima
    differ, so the weights cannot either. The spread comes from the key norms (the keys' codes
    barely differ), which keeps the kernel's half-precision operands from blurring it.
    8 splits of one 16-token tile take the per-row merge (reduce_kernel, > 4 splits); 3 splits
    of three tiles the per-group one."""
    hkv, group, dim = 2, 3, 64
    u = torch.randn(hkv, dim, generator=torch.Generator().manual_seed(seed + 1))
    u /= u.norm(dim=-1, keepdim=True)

    def keys(key, g):
        return 20 * u + 0.1 * key

    def queries(query, g):
        return 83 * u.repeat_interleave(group, dim=0) + 0.5 * query

    run_case([100, 37], hkv, group, dim, 16, 4, 4, torch.float16, seed=seed, num_splits=splits, block_n=16,
             key_fn=keys, query_fn=queries)


def _strided_view(tables, num_blocks, g):
    """The same entries as a column slice of a wider table whose other columns hold other valid
    blocks: row s starts at s * (2M + 1) + 1, not at s * M."""
    s, m = tables.shape
    wide = torch.randint(0, num_blocks, (s, 2 * m + 1), generator=g, dtype=torch.int32)
    wide[:, 1 : m + 1] = tables
    view = wide[:, 1 : m + 1]
    assert not view.is_contiguous() and view.stride() == (2 * m + 1, 1)
    return view


def test_block_table_row_stride(seed):
    run_case([20, 35, 7], 2, 2, 64, 16, 4, 2, torch.float16, seed=seed, table_fn=_strided_view)


def _without_the_spare_column(tables, num_blocks, g):
    """The table with no column past the longest context: its last split is live, not empty."""
    return tables[:, :-1].contiguous()


@pytest.mark.parametrize("splits", [3, 6])
def test_the_last_split_holds_live_tokens(splits, seed):
    """make_case's spare table column makes the last split of every other test empty, so a merge
    that dropped the last split would pass them. Here the longest context fills the table (96 =
    6 blocks of 16) and the keys rise along it, so the last split holds the largest scores:
    6 splits take the per-row merge (> 4 splits), 3 the per-group one."""
    run_case([96, 81], 2, 2, 64, 16, 4, 3, torch.float16, seed=seed, num_splits=splits, block_n=16,
             key_fn=_rising_keys, table_fn=_without_the_spare_column)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_norms_above_the_half_range(dtype, seed):
    """Value norms of 1e5-1e6 (beyond fp16's 65504): the kernel rounds P * ||v|| to fp16 for the
    P.V product, so it divides by the tile's largest norm first; without that the product is inf.
    The output stays in float32 / bfloat16 range."""
    run_case([40, 7], 1, 4, 64, 16, 4, 4, dtype, seed=seed, num_splits=2, block_n=16,
             value_fn=lambda value, g: value * (2e4 + 1e5 * torch.rand(value.shape[0], 1, 1, generator=g)))


def test_explicit_scale_and_dense_oracle():
    ctxs, hkv, group, dim, page, bits = [9, 30], 2, 2, 64, 16, 4
    query, cache, tables, ctx, rot, kcb, vcb = make_case(ctxs, hkv, group, dim, page, bits, bits, torch.float32, 7)
    dense = dense_attention_reference(query, *cache.tensors(), tables, ctx, rot, kcb, vcb, bits, bits, 0.3)
    dev = [x.to(DEV) for x in (query, *cache.tensors(), tables, ctx, rot, kcb, vcb)]
    got = attention(*dev, bits, bits, 0.3).cpu()
    err = ((got - dense).norm() / dense.norm()).item()
    assert err < 5e-3, f"relative error against the dense oracle {err:.2e}"


def test_split_heuristic_covers_context():
    for pairs, tokens in [(64, 32768), (8, 131072), (512, 2048), (8, 32768), (1, 1), (3, 100)]:
        splits, per = tqt.paged_attention.choose_splits(pairs, tokens, 64, 132)
        assert splits >= 1 and per % 64 == 0 and splits * per >= tokens and (splits - 1) * per < tokens
    assert tqt.paged_attention.choose_splits(8, 131072, 64, 132)[0] > 1  # few sequences, long context: split-K
    assert tqt.paged_attention.choose_splits(512, 2048, 64, 132)[0] == 1


def test_bad_arguments_name_the_argument():
    query, cache, tables, ctx, rot, kcb, vcb = make_case([5], 1, 2, 64, 16, 4, 4, torch.float16, 1)
    args = [x.to(DEV) for x in (query, *cache.tensors(), tables, ctx, rot, kcb, vcb)]
    with pytest.raises(ValueError, match="k_bits"):
        attention(*args, 9, 4)
    with pytest.raises(ValueError, match="context_lens"):
        attention(*args[:6], args[6].long(), *args[7:], 4, 4)


def run_mean_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed, magnitude=1.0, rate_scale=1.0,
                  num_splits=None, norm_dtype=torch.float32):
    """The Triton attention with key_mean and rope_inv_freq against the reference; returns
    (kernel output, reference with the mean, reference without it) in float32."""
    query, cache, tables, ctx, rot, kcb, vcb = make_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed,
                                                         norm_dtype=norm_dtype)
    mean, rates = draw_key_mean(hkv, dim, torch.Generator().manual_seed(seed + 1), magnitude, rate_scale)
    args = (query, *cache.tensors(), tables, ctx, rot, kcb, vcb)
    want = paged_attention_reference(*args, k_bits, v_bits, 0.0, mean, rates).float()
    plain = paged_attention_reference(*args, k_bits, v_bits).float()
    dev = [x.to(DEV) for x in args]
    got = attention(*dev, k_bits, v_bits, 0.0, mean.to(DEV), rates.to(DEV), num_splits=num_splits)
    assert got.dtype == query.dtype and got.shape == query.shape
    assert_same_with_float32_norms(got, dev, k_bits, v_bits, 0.0, mean.to(DEV), rates.to(DEV), num_splits=num_splits)
    got = got.cpu().float()
    assert torch.isfinite(got).all()
    assert (got[ctx == 0] == 0).all(), "a context of 0 tokens gives zeros"
    err = relative_error(got, want)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]}"
    return got, want, plain


MEAN_CASES = [
    # ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, num_splits, |mu|, rate scale
    ([0, 1, 17], 2, 4, 64, 16, 4, 3, torch.float16, None, 1.0, 1.0),
    ([33, 70], 1, 6, 128, 16, 3, 2, torch.bfloat16, 3, 5.0, 1.0),
    ([47, 2], 2, 1, 64, 32, 2, 5, torch.float32, 2, 5.0, 1.0),
    ([200, 9], 1, 4, 128, 64, 4, 6, torch.float16, None, 5.0, 30.0),  # angles t * w up to 6000 radians
]


@pytest.mark.parametrize("ctxs,hkv,group,dim,page,k_bits,v_bits,dtype,splits,magnitude,rate_scale", MEAN_CASES)
def test_key_mean_matches_reference(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, splits, magnitude,
                                    rate_scale, seed):
    got, want, plain = run_mean_case(ctxs, hkv, group, dim, page, k_bits, v_bits, dtype, seed, magnitude,
                                     rate_scale, num_splits=splits)
    if magnitude >= 5:  # the mean is no rounding-level change: leaving it out fails the tolerance
        assert relative_error(got, plain) > 10 * TOL[dtype]


def test_key_mean_float16_norms(seed):
    """The key-mean path over a float16-norm cache: GQA of 6, k_bits != v_bits, 3 splits."""
    run_mean_case([33, 70], 1, 6, 128, 16, 3, 2, torch.float16, seed, magnitude=5.0, num_splits=3,
                  norm_dtype=torch.float16)


def mean_oracle(query, cache, tables, ctx, rot, kcb, vcb, k_bits, v_bits, mean, rates, first):
    """Dense attention over the decoded keys with R_t mean added at positions t >= first (None: nowhere).
    first = 1 is the op; 0 and None are the two ways to get it wrong."""
    keys = decode_reference(cache.k_codes, cache.k_norms, rot, kcb, k_bits)  # [N, B, Hkv, D]
    values = decode_reference(cache.v_codes, cache.v_norms, rot, vcb, v_bits)
    s, hq, dim = query.shape
    page, group = cache.block_size, hq // mean.shape[0]
    out = torch.zeros(s, hq, dim)
    for i, c in enumerate(ctx.tolist()):
        t = torch.arange(c)
        blocks = tables[i, t // page].long()
        k, v = keys[blocks, t % page], values[blocks, t % page]  # [c, Hkv, D]
        if first is not None:
            k = k + rope_turned(mean, rates, t) * (t >= first)[:, None, None]
        scores = torch.einsum("hd,lhd->hl", query[i].float(), k.repeat_interleave(group, dim=1)) * dim ** -0.5
        out[i] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v.repeat_interleave(group, dim=1))
    return out


def test_key_mean_starts_at_position_one(seed):
    """Short contexts and a large mean the queries lean towards, so token 0's score moves by several
    units if the kernel adds q . mu there too, and every later score if it skips the mean: the kernel
    must match the oracle with the mean from position 1 and be far from both mistakes."""
    ctxs, hkv, group, dim, page, bits = [2, 3, 5, 20], 2, 2, 64, 16, 4
    mean, rates = draw_key_mean(hkv, dim, torch.Generator().manual_seed(seed + 1), magnitude=5.0)
    lean = mean.repeat_interleave(group, dim=0) / 5

    query, cache, tables, ctx, rot, kcb, vcb = make_case(ctxs, hkv, group, dim, page, bits, bits, torch.float32, seed,
                                                         query_fn=lambda q, g: q + lean)
    args = (query, *cache.tensors(), tables, ctx, rot, kcb, vcb)
    dev = [x.to(DEV) for x in args]
    got = attention(*dev, bits, bits, 0.0, mean.to(DEV), rates.to(DEV)).cpu()
    right = mean_oracle(query, cache, tables, ctx, rot, kcb, vcb, bits, bits, mean, rates, first=1)
    assert relative_error(right, dense_attention_reference(*args, bits, bits, 0.0, mean, rates)) < 1e-4
    assert relative_error(got, right) < TOL[torch.float32]
    for first in (0, None):
        wrong = mean_oracle(query, cache, tables, ctx, rot, kcb, vcb, bits, bits, mean, rates, first=first)
        assert relative_error(got, wrong) > 10 * TOL[torch.float32], f"the mean applied from position {first}"


GPU_MEAN_SHAPES = [(4, 128, 4, 4, torch.float16), (1, 64, 3, 2, torch.bfloat16), (6, 128, 8, 5, torch.float16),
                   (8, 256, 2, 4, torch.bfloat16)]


@gpu
@needs_cuda
@pytest.mark.parametrize("group,dim,k_bits,v_bits,dtype", GPU_MEAN_SHAPES)
def test_gpu_key_mean_larger_contexts(group, dim, k_bits, v_bits, dtype):
    """Long contexts with split-K, a large mean and angles t * w up to 2e5 radians (10x the usual rates)."""
    run_mean_case([1, 15, 777, 20_000], 2, group, dim, 16, k_bits, v_bits, dtype, seed=group + dim, magnitude=5.0,
                  rate_scale=10.0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,dim,page,k_bits,v_bits", [(4, 128, 16, 4, 4), (8, 128, 32, 3, 2), (1, 64, 16, 2, 4),
                                                          (4, 256, 16, 4, 3), (4, 128, 16, 8, 5), (6, 64, 32, 7, 6)])
def test_gpu_larger_contexts(group, dim, page, k_bits, v_bits, dtype):
    ctxs = [1, page - 1, page + 1, 777, 3000, 4096]
    run_case(ctxs, 2, group, dim, page, k_bits, v_bits, dtype, seed=group + dim + page)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_gpu_long_context_split_k(bits):
    got = run_case([50_000], 8, 4, 128, 16, bits, bits, torch.float16, seed=bits)
    assert torch.isfinite(got).all()
