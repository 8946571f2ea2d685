"""Triton paged prefill attention (TQPagedPrefill) against the PyTorch reference.

Without CUDA the kernel runs under the Triton interpreter on CPU tensors (small shapes); with CUDA
the same cases run compiled, plus larger ones marked gpu. Inputs come from the op's own input
drawer (tq_deploy.validate.inputs.paged_prefill_inputs): NaN norms and random codes in every slot
no context covers, junk block-table entries past each sequence's blocks, a sequence with no new
token, one-token prompts, a chunk crossing a block boundary and a chunk that is its whole context.
The key-mean inputs (key_mean, rope_inv_freq: q . R_t mu added to the scores of positions t >= 1) run
on their own cases, with means up to |mu| ~ 5 and angles t * w of thousands of radians. A few cases run
over float16 cache norms, whose output must also equal, bit for bit, that of the same norms in float32.

Tolerance (norm-wise relative error against the reference, in float32) as for the decode kernel:
5e-3 for fp16/fp32 queries, 1.5e-2 for bf16 (fp16 operands, fp32 accumulation).
"""

import pytest
import torch

pytest.importorskip("triton")  # interpreted without CUDA: tests/conftest.py sets TRITON_INTERPRET

from tq_deploy.triton.interpret import load_kernels  # noqa: E402

try:
    tqt = load_kernels()
except RuntimeError as exc:  # triton already imported in compiled mode by an earlier module
    pytest.skip(str(exc), allow_module_level=True)

from tq_deploy.reference import checks  # noqa: E402
from tq_deploy.reference.paged import paged_prefill_reference, rope_turned  # noqa: E402
from tq_deploy.reference.quantizer import decode_reference  # noqa: E402
from key_mean_support import draw_key_mean, relative_error  # noqa: E402
from test_paged_prefill import ARG_NAMES, make_prefill  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TOL = {torch.float16: 5e-3, torch.float32: 5e-3, torch.bfloat16: 1.5e-2}


def prefill(inputs, rot, kcb, vcb, k_bits, v_bits, scale=0.0, key_mean=None, rope_inv_freq=None, **knobs):
    """The Triton prefill on checked arguments (the dispatcher's route, without the dispatch)."""
    args = [inputs[n].to(DEV) for n in ARG_NAMES]
    mean = [None if x is None else x.to(DEV) for x in (key_mean, rope_inv_freq)]
    checked = checks.check_paged_prefill(*args, rot.to(DEV), kcb.to(DEV), vcb.to(DEV), k_bits, v_bits, scale, *mean,
                                         check_data=False)
    return tqt.paged_prefill.paged_prefill(checked, **knobs)


def with_norms(inputs, norm_dtype):
    """The inputs over a cache whose norms are ``norm_dtype``: for float16 what a float16-norm cache
    update stores (the same codes, each float32 norm rounded to nearest even; NaN junk stays NaN)."""
    return dict(inputs, k_norms=inputs["k_norms"].to(norm_dtype), v_norms=inputs["v_norms"].to(norm_dtype))


def assert_same_with_float32_norms(got, inputs, *args, **knobs):
    """With float16 cache norms, the output must be the one of the same cache with its norms widened
    to float32, bit for bit: the kernel widens them on load (exact) and computes as before."""
    if inputs["k_norms"].dtype == torch.float16:
        wide = prefill(with_norms(inputs, torch.float32), *args, **knobs)
        assert torch.equal(got, wide), "float16 norms must give the output of the same norms in float32"


def run_case(gen, *, dim, hq, hkv, page, k_bits, v_bits, dtype, lens=None, counts=None, scale=0.0,
             norm_dtype=torch.float32, **knobs):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=dim, hq=hq, hkv=hkv, block_size=page, k_bits=k_bits,
                                         v_bits=v_bits, lens=lens, counts=counts, dtype=dtype)
    return run_case_on(with_norms(inputs, norm_dtype), rot, kcb, vcb, k_bits, v_bits, scale, **knobs)


def run_case_on(inputs, rot, kcb, vcb, k_bits, v_bits, scale=0.0, **knobs):
    dtype = inputs["query"].dtype
    want = paged_prefill_reference(*(inputs[n] for n in ARG_NAMES), rot, kcb, vcb, k_bits, v_bits, scale).float()
    got = prefill(inputs, rot, kcb, vcb, k_bits, v_bits, scale, **knobs)
    assert got.dtype == dtype and got.shape == inputs["query"].shape
    assert_same_with_float32_norms(got, inputs, rot, kcb, vcb, k_bits, v_bits, scale, **knobs)
    got = got.cpu().float()
    assert torch.isfinite(got).all(), "a slot or table entry the call must not read reached the output"
    err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]}"
    return got, want


CASES = [
    # dim, hq, hkv, page, k_bits, v_bits, dtype; default lens: n_s 0, 1, 1, 6 across a block boundary, whole 2B
    (64, 2, 2, 16, 4, 4, torch.float32),
    (64, 6, 2, 16, 3, 2, torch.float16),
    (128, 8, 2, 32, 2, 5, torch.float16),
    (64, 8, 1, 16, 8, 1, torch.bfloat16),
    (32, 4, 1, 8, 7, 6, torch.float32),
]


@pytest.mark.parametrize("dim,hq,hkv,page,k_bits,v_bits,dtype", CASES)
def test_prefill_matches_reference(dim, hq, hkv, page, k_bits, v_bits, dtype, gen):
    run_case(gen, dim=dim, hq=hq, hkv=hkv, page=page, k_bits=k_bits, v_bits=v_bits, dtype=dtype)


@pytest.mark.parametrize("dim,hq,hkv,page,k_bits,v_bits,dtype", [CASES[1], CASES[3]])  # GQA, k_bits != v_bits
def test_float16_norms_match_reference(dim, hq, hkv, page, k_bits, v_bits, dtype, gen):
    run_case(gen, dim=dim, hq=hq, hkv=hkv, page=page, k_bits=k_bits, v_bits=v_bits, dtype=dtype,
             norm_dtype=torch.float16)


def test_tiles_smaller_than_a_chunk_and_many_kv_tiles(gen):
    """block_m 4 / block_n 16: several query tiles per sequence and several K/V tiles per query tile,
    so the tile lookup, the online-softmax rescale and the diagonal tile's mask all run."""
    run_case(gen, dim=64, hq=4, hkv=2, page=16, k_bits=4, v_bits=3, dtype=torch.float16, lens=[45, 3, 20],
             counts=[29, 3, 0], scale=0.4, block_m=4, block_n=16)


def test_group_of_256_dims_and_a_single_sequence(gen):
    run_case(gen, dim=256, hq=3, hkv=1, page=16, k_bits=1, v_bits=4, dtype=torch.float16, lens=[21], counts=[21])


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float16])
def test_a_row_never_reads_its_own_future(norm_dtype, gen):
    """NaN norms in the last token of a chunk: the chunk's earlier rows stay finite, its last is NaN."""
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=2, block_size=16, k_bits=4, v_bits=4,
                                         lens=[20], counts=[8], dtype=torch.float16)
    inputs = with_norms(inputs, norm_dtype)
    block = int(inputs["block_tables"][0, 19 // 16])
    inputs["v_norms"][block, 19 % 16] = float("nan")
    inputs["k_norms"][block, 19 % 16] = float("inf")
    got = prefill(inputs, rot, kcb, vcb, 4, 4).cpu()
    assert torch.isfinite(got[:7]).all() and torch.isnan(got[7]).all()


def test_a_row_whose_every_score_is_far_below_any_floor(gen):
    """One sequence, one token, its key norm 1e33 and every query head pointing away from it: each
    score is about -4e33 (finite). Softmax over one token is 1, so the output is that token's value;
    a running max that started at a finite floor (-1e30) would give zeros."""
    from tq_deploy.reference.paged import decode_reference

    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=2, block_size=16, k_bits=4, v_bits=3, lens=[1],
                                         counts=[1], dtype=torch.float32)
    block = int(inputs["block_tables"][0, 0])
    inputs["k_norms"][block, 0] = 1e33
    keys = decode_reference(inputs["k_codes"][block, 0], torch.ones(2), rot, kcb, 4)  # [Hkv, D], unit norm
    inputs["query"][0] = -4 * keys.repeat_interleave(2, dim=0)
    got, want = run_case_on(inputs, rot, kcb, vcb, 4, 3)
    assert got.abs().amax(dim=-1).min() > 0, "a row came out as zeros"
    values = decode_reference(inputs["v_codes"][block, 0], inputs["v_norms"][block, 0], rot, vcb, 3)
    torch.testing.assert_close(want[0], values.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-6)


def test_unchecked_query_start_stays_in_bounds(gen):
    """What the GPU path does with query_start it never reads on the host (docs/ops.md, Bad input):
    ranges clamped to [0, T], a row whose position falls before the context sees no token (zeros),
    rows no sequence owns stay zero."""
    inputs, rot, kcb, vcb = make_prefill(gen, dim=32, hq=2, hkv=1, block_size=8, k_bits=2, v_bits=2,
                                         lens=[3, 9], counts=[3, 2])
    good = prefill(inputs, rot, kcb, vcb, 2, 2).cpu()
    over = dict(inputs, query_start=torch.tensor([0, 5, 5], dtype=torch.int32))  # 5 rows for a context of 3
    got = prefill(over, rot, kcb, vcb, 2, 2).cpu()
    assert torch.equal(got[:2], torch.zeros_like(got[:2]))  # positions -2 and -1
    fits = dict(inputs, query=inputs["query"][2:5], query_start=torch.tensor([0, 3, 3], dtype=torch.int32))
    torch.testing.assert_close(got[2:5], prefill(fits, rot, kcb, vcb, 2, 2).cpu())  # positions 0-2 as usual
    wild = dict(inputs, query_start=torch.tensor([-4, 2, 99], dtype=torch.int32))
    got = prefill(wild, rot, kcb, vcb, 2, 2).cpu()  # rows 0-1 for sequence 0, rows 2-4 for sequence 1
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[3:], good[3:])
    gap = dict(inputs, query_start=torch.tensor([0, 2, 2], dtype=torch.int32))  # rows 2-4 owned by nobody
    got = prefill(gap, rot, kcb, vcb, 2, 2).cpu()
    assert torch.equal(got[2:], torch.zeros_like(got[2:]))


def test_dispatcher_runs_the_reference_on_cpu_and_checks_data(gen):
    from tq_deploy.dispatch import backend_for, paged_prefill

    inputs, rot, kcb, vcb = make_prefill(gen, dim=32, hq=2, hkv=1, block_size=8, k_bits=2, v_bits=3)
    args = (*(inputs[n] for n in ARG_NAMES), rot, kcb, vcb, 2, 3)
    assert torch.equal(paged_prefill(*args), paged_prefill_reference(*args))
    assert backend_for("paged_prefill", checks.check_paged_prefill(*args)) == "reference"
    bad = list(args)
    bad[7] = torch.tensor([0, 0, 1, 2, 14, 24], dtype=torch.int32)  # context 11, 12 rows
    with pytest.raises(ValueError, match="sequence 3 has 12 query rows"):
        paged_prefill(*bad)


def run_mean_case(gen, *, dim, hq, hkv, page, k_bits, v_bits, dtype, lens=None, counts=None, magnitude=1.0,
                  rate_scale=1.0, norm_dtype=torch.float32, **knobs):
    """The Triton prefill with key_mean and rope_inv_freq against the reference; returns (kernel output,
    reference with the mean, reference without it) in float32."""
    inputs, rot, kcb, vcb = make_prefill(gen, dim=dim, hq=hq, hkv=hkv, block_size=page, k_bits=k_bits,
                                         v_bits=v_bits, lens=lens, counts=counts, dtype=dtype)
    inputs = with_norms(inputs, norm_dtype)
    mean, rates = draw_key_mean(hkv, dim, gen, magnitude, rate_scale)
    args = (*(inputs[n] for n in ARG_NAMES), rot, kcb, vcb, k_bits, v_bits, 0.0)
    want = paged_prefill_reference(*args, mean, rates).float()
    plain = paged_prefill_reference(*args).float()
    got = prefill(inputs, rot, kcb, vcb, k_bits, v_bits, 0.0, mean, rates, **knobs)
    assert got.dtype == dtype and got.shape == inputs["query"].shape
    assert_same_with_float32_norms(got, inputs, rot, kcb, vcb, k_bits, v_bits, 0.0, mean, rates, **knobs)
    got = got.cpu().float()
    assert torch.isfinite(got).all(), "a slot or table entry the call must not read reached the output"
    err = relative_error(got, want)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]}"
    return got, want, plain


MEAN_CASES = [
    # dim, hq, hkv, page, k_bits, v_bits, dtype, lens, counts, |mu|, rate scale, knobs
    # default lens: n_s 0, 1, 1, 6 across a block boundary, whole 2B
    (64, 2, 2, 16, 4, 4, torch.float32, None, None, 1.0, 1.0, {}),
    (128, 8, 2, 32, 2, 5, torch.float16, None, None, 5.0, 1.0, {}),
    (64, 6, 1, 16, 3, 2, torch.bfloat16, [45, 3, 20], [29, 3, 0], 5.0, 1.0, {"block_m": 4, "block_n": 16}),
    (128, 4, 4, 64, 4, 6, torch.float16, [200, 1], [5, 1], 5.0, 30.0, {}),  # angles t * w up to 6000 radians
]


@pytest.mark.parametrize("dim,hq,hkv,page,k_bits,v_bits,dtype,lens,counts,magnitude,rate_scale,knobs", MEAN_CASES)
def test_key_mean_matches_reference(dim, hq, hkv, page, k_bits, v_bits, dtype, lens, counts, magnitude, rate_scale,
                                    knobs, gen):
    got, want, plain = run_mean_case(gen, dim=dim, hq=hq, hkv=hkv, page=page, k_bits=k_bits, v_bits=v_bits,
                                     dtype=dtype, lens=lens, counts=counts, magnitude=magnitude,
                                     rate_scale=rate_scale, **knobs)
    if magnitude >= 5:  # the mean is no rounding-level change: leaving it out fails the tolerance
        assert relative_error(got, plain) > 10 * TOL[dtype]


def test_key_mean_float16_norms(gen):
    """The key-mean path over a float16-norm cache: GQA of 6, k_bits != v_bits, several query and K/V tiles."""
    run_mean_case(gen, dim=64, hq=6, hkv=1, page=16, k_bits=3, v_bits=2, dtype=torch.bfloat16, lens=[45, 3, 20],
                  counts=[29, 3, 0], magnitude=5.0, norm_dtype=torch.float16, block_m=4, block_n=16)


def mean_oracle(inputs, rot, kcb, vcb, k_bits, v_bits, mean, rates, first):
    """Causal dense attention over the decoded keys with R_t mean added at positions t >= first (None:
    nowhere). first = 1 is the op; 0 and None are the two ways to get it wrong."""
    query = inputs["query"]
    t, hq, dim = query.shape
    keys = decode_reference(inputs["k_codes"], inputs["k_norms"], rot, kcb, k_bits)  # [N, B, Hkv, D]
    values = decode_reference(inputs["v_codes"], inputs["v_norms"], rot, vcb, v_bits)
    page, group = keys.shape[1], hq // mean.shape[0]
    starts = inputs["query_start"].tolist()
    out = torch.zeros(t, hq, dim)
    for s, ctx in enumerate(inputs["context_lens"].tolist()):
        row, n = starts[s], starts[s + 1] - starts[s]
        pos = torch.arange(ctx)
        blocks = inputs["block_tables"][s, pos // page].long()
        k, v = keys[blocks, pos % page], values[blocks, pos % page]  # [ctx, Hkv, D]
        if first is not None:
            k = k + rope_turned(mean, rates, pos) * (pos >= first)[:, None, None]
        scores = torch.einsum("nhd,lhd->nhl", query[row:row + n].float(), k.repeat_interleave(group, dim=1))
        causal = pos[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # [n, ctx]
        scores = (scores * dim ** -0.5).masked_fill(~causal[:, None, :], float("-inf"))
        out[row:row + n] = torch.einsum("nhl,lhd->nhd", torch.softmax(scores, dim=-1),
                                        v.repeat_interleave(group, dim=1))
    return out


def test_key_mean_starts_at_position_one(gen):
    """Short prompts and a large mean the queries lean towards, so token 0's score moves by several units
    if the kernel adds q . mu there too, and every later score if it skips the mean: the kernel must
    match the oracle with the mean from position 1 and be far from both mistakes."""
    hq, hkv, dim, bits = 4, 2, 64, 4
    inputs, rot, kcb, vcb = make_prefill(gen, dim=dim, hq=hq, hkv=hkv, block_size=16, k_bits=bits, v_bits=bits,
                                         lens=[2, 4, 20], counts=[2, 3, 6])
    mean, rates = draw_key_mean(hkv, dim, gen, magnitude=5.0)
    inputs["query"] = inputs["query"] + mean.repeat_interleave(hq // hkv, dim=0) / 5
    got = prefill(inputs, rot, kcb, vcb, bits, bits, 0.0, mean, rates).cpu()
    right = mean_oracle(inputs, rot, kcb, vcb, bits, bits, mean, rates, first=1)
    want = paged_prefill_reference(*(inputs[n] for n in ARG_NAMES), rot, kcb, vcb, bits, bits, 0.0, mean, rates)
    assert relative_error(right, want) < 1e-4
    assert relative_error(got, right) < TOL[torch.float32]
    for first in (0, None):
        wrong = mean_oracle(inputs, rot, kcb, vcb, bits, bits, mean, rates, first=first)
        assert relative_error(got, wrong) > 10 * TOL[torch.float32], f"the mean applied from position {first}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dim,hq,hkv,page,k_bits,v_bits,dtype", [(128, 32, 8, 16, 4, 4, torch.float16),
                                                                 (64, 8, 8, 16, 2, 4, torch.bfloat16),
                                                                 (128, 24, 4, 64, 8, 5, torch.float16),
                                                                 (256, 8, 1, 16, 4, 3, torch.float32)])
def test_gpu_key_mean_long_prompts(dim, hq, hkv, page, k_bits, v_bits, dtype):
    """Long prompts with a large mean and angles t * w up to 4e4 radians (10x the usual rates)."""
    gen = torch.Generator().manual_seed(dim + hq + page)
    run_mean_case(gen, dim=dim, hq=hq, hkv=hkv, page=page, k_bits=k_bits, v_bits=v_bits, dtype=dtype,
                  lens=[1, page - 1, 777, 4096], counts=[1, page - 1, 300, 1000], magnitude=5.0, rate_scale=10.0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim,hq,hkv,page,k_bits,v_bits", [(128, 32, 8, 16, 4, 4), (128, 12, 4, 32, 3, 2),
                                                           (64, 8, 8, 16, 2, 4), (256, 8, 1, 16, 4, 3),
                                                           (128, 24, 4, 64, 8, 5), (64, 6, 1, 32, 7, 6)])
def test_gpu_long_prompts(dim, hq, hkv, page, k_bits, v_bits, dtype):
    gen = torch.Generator().manual_seed(dim + hq + page)
    lens = [1, page - 1, 777, 3000, 2048, 4096]
    counts = [1, page - 1, 300, 3000, 1, 1000]
    run_case(gen, dim=dim, hq=hq, hkv=hkv, page=page, k_bits=k_bits, v_bits=v_bits, dtype=dtype, lens=lens,
             counts=counts)


@gpu
@needs_cuda
def test_gpu_dispatch_takes_triton():
    from tq_deploy.dispatch import backend_for, use_backend

    gen = torch.Generator().manual_seed(3)
    inputs, rot, kcb, vcb = make_prefill(gen, dim=128, hq=8, hkv=2, block_size=16, k_bits=4, v_bits=4)
    args = (*(inputs[n].cuda() for n in ARG_NAMES), rot, kcb, vcb, 4, 4)
    with use_backend("auto"):
        assert backend_for("paged_prefill", checks.check_paged_prefill(*args, check_data=False)) == "triton"
