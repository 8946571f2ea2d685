"""The CUDA paged attention (libtq_deploy_cuda.so, tq_deploy.cuda) against an independent float64
oracle (tests/test_paged.py: every cached vector decoded as norm * (c[idx] @ Pi), torch SDPA per
sequence).

Fresh random caches each run (every slot holds some vector, unused table entries hold garbage);
odd shapes: context 0/1, partial last blocks, exactly one block, GQA 1/4/6/8 and 12/16/32 (query
heads in chunks of 8), D 33/50/64/72/80/96/100/128/256/320, blocks 1/8/16/24/32/40/64 (tiles
across blocks), k_bits != v_bits over 1-8 bits (packed rows that start inside a word), fp32/fp16/
bf16 queries, forced tiny splits (many partials through the merge). Both kernels: the tensor-core
one (packed layout for D 64/128/256, widened from any width for other D up to 256) and the generic
one (larger D, misaligned codes). Caches with float32 and float16 norms (the oracle decodes the
float16 norms the kernels read, so the tolerances are the same).

Tolerance: norm-wise relative error 5e-3 (fp16 centroids and q_rot in the tensor-core kernel,
fp32 accumulation); 1e-2 for bf16 queries (the output is rounded to bf16).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from test_paged import make_case, oracle_over_slots, sdpa_oracle
from tq_deploy import abi, ops
from tq_deploy import cuda as tq_cuda
from tq_deploy import dispatch
from tq_deploy.dispatch import paged_attention
from tq_deploy.reference.checks import check_cache_update, check_paged_attention
from tq_deploy.reference.paged import paged_attention_reference, paged_prefill_reference
from tq_deploy.runtime import library

gpu = pytest.mark.gpu
TOL = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def needs_library():
    if not tq_cuda.available():
        pytest.skip(tq_cuda.unavailable_reason())


def checked(args):
    return check_paged_attention(*args, check_data=False)


def cuda_attention(*args, **knobs):
    """The CUDA backend on checked arguments (the dispatcher's route, without the dispatch)."""
    return tq_cuda.paged_attention(checked(args), **knobs)


def on_cuda(case, dtype):
    args = case.args(query=case.query.to(dtype))
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


def with_norms(case, norm_dtype):
    """The case with its cache's norms stored as ``norm_dtype``: what a cache update into such a cache
    stores (the float32 norms rounded to nearest even)."""
    k_codes, k_norms, v_codes, v_norms = case.caches
    case.caches = (k_codes, k_norms.to(norm_dtype), v_codes, v_norms.to(norm_dtype))
    return case


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


CASES = {
    # name: dim, hq, hkv, block_size, context lengths, k_bits, v_bits        (tensor-core kernel)
    "gqa1-d64-b16-k4v4": (64, 4, 4, 16, [1, 15, 17, 16], 4, 4),
    "gqa4-d128-b32-k4v2": (128, 8, 2, 32, [31, 33, 1, 300], 4, 2),
    "gqa8-d256-b16-k2v4": (256, 8, 1, 16, [700, 16, 0, 5], 2, 4),
    "gqa8-d128-b16-k3v3": (128, 16, 2, 16, [640, 1, 32], 3, 3),
    "gqa4-d64-b64-k3v2": (64, 8, 2, 64, [17, 64, 15, 1, 400], 3, 2),
    "gqa6-d128-b16-k6v4": (128, 12, 2, 16, [129, 2, 1000], 6, 4),
    "gqa8-d128-b32-k8v4": (128, 32, 4, 32, [513, 7], 8, 4),
    "gqa1-d256-b32-k8v3": (256, 2, 2, 32, [65, 1], 8, 3),
    "gqa2-d64-b16-k6v2": (64, 4, 2, 16, [48, 3], 6, 2),
    # every bit width pair, query heads in chunks of 8, blocks that are not a multiple of 16
    "gqa4-d128-b16-k5v3": (128, 8, 2, 16, [300, 1], 5, 3),
    "gqa32-d64-b16-k4v4": (64, 32, 1, 16, [90, 2], 4, 4),
    "gqa4-d64-b8-k2v2": (64, 8, 2, 8, [41, 8, 0], 2, 2),
    "gqa1-d128-b16-k1v8": (128, 2, 2, 16, [200], 1, 8),
    "gqa2-d256-b32-k7v5": (256, 4, 2, 32, [97, 33], 7, 5),
    "gqa12-d128-b24-k4v4": (128, 24, 2, 24, [333, 17, 0, 24], 4, 4),
    "gqa16-d256-b1-k3v3": (256, 16, 1, 1, [70, 5, 1], 3, 3),
    "gqa1-d128-b40-k8v8": (128, 3, 3, 40, [121, 40, 39], 8, 8),
    "gqa6-d64-b8-k5v6": (64, 12, 2, 8, [257, 3], 5, 6),
    "gqa16-d128-b64-k7v1": (128, 32, 2, 64, [130, 64], 7, 1),
    # other head dims: the tensor-core kernel of the dim padded to a multiple of 32, codes widened
    "gqa1-d100-b16-k4v4": (100, 4, 4, 16, [77, 16], 4, 4),
    "gqa16-d96-b8-k5v3": (96, 32, 2, 8, [150, 9, 0], 5, 3),
    "gqa3-d72-b24-k3v6": (72, 6, 2, 24, [49, 24], 3, 6),
    "gqa2-d80-b16-k3v5": (80, 4, 2, 16, [200, 31], 3, 5),
    "gqa5-d50-b8-k7v1": (50, 10, 2, 8, [77, 8], 7, 1),
    "gqa1-d33-b16-k3v2": (33, 2, 2, 16, [40, 1, 0], 3, 2),
    # generic kernel: head dims past 256
    "gqa2-d320-b16-k4v3": (320, 4, 2, 16, [70, 3], 4, 3),
}


@gpu
@pytest.mark.parametrize("tokens_per_split", [0, 16, 48])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_float64_oracle(gen, name, dtype, tokens_per_split):
    needs_library()
    dim, hq, hkv, block, ctx, kb, vb = CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=ctx, k_bits=kb, v_bits=vb)
    case.query = case.query.to(dtype)
    want = sdpa_oracle(case)
    args = on_cuda(case, dtype)
    assert tq_cuda.supports_paged_attention(checked(args))
    got = cuda_attention(*args, tokens_per_split=tokens_per_split)
    assert got.dtype == dtype and got.shape == case.query.shape
    got = got.cpu()
    assert torch.isfinite(got).all()
    assert (got[case.context_lens == 0] == 0).all(), "a context of 0 tokens gives zeros"
    err = relative_error(got, want)
    assert err < TOL[dtype], f"{name} {dtype} split {tokens_per_split}: relative error {err:.2e}"


# float16 cache norms on every path: the tensor-core kernel's whole tiles (blocks of 16, 32), rows
# looked up one by one (blocks of 1, 8, 24, 40) and its raw path (D 96, 33), the generic kernel (D 320,
# float32 queries); splits of 3 and 10 tiles per warp run the copy ring around (norms staged through
# registers, tq_paged_attention_mma.cuh: NormCopy)
HALF_NORM_CASES = ["gqa1-d64-b16-k4v4", "gqa4-d128-b32-k4v2", "gqa8-d256-b16-k2v4", "gqa6-d128-b16-k6v4",
                   "gqa4-d64-b8-k2v2", "gqa12-d128-b24-k4v4", "gqa16-d256-b1-k3v3", "gqa1-d128-b40-k8v8",
                   "gqa16-d96-b8-k5v3", "gqa1-d33-b16-k3v2", "gqa2-d320-b16-k4v3"]


@gpu
@pytest.mark.parametrize("tokens_per_split", [0, 48, 160])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", HALF_NORM_CASES)
def test_float16_norms_match_the_float64_oracle(gen, name, dtype, tokens_per_split):
    needs_library()
    dim, hq, hkv, block, ctx, kb, vb = CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=ctx, k_bits=kb, v_bits=vb)
    case = with_norms(case, torch.float16)
    case.query = case.query.to(dtype)
    want = sdpa_oracle(case)
    args = on_cuda(case, dtype)
    assert tq_cuda.supports_paged_attention(checked(args))
    got = cuda_attention(*args, tokens_per_split=tokens_per_split).cpu()
    assert torch.isfinite(got).all()
    assert (got[case.context_lens == 0] == 0).all(), "a context of 0 tokens gives zeros"
    err = relative_error(got, want)
    assert err < TOL[dtype], f"{name} {dtype} split {tokens_per_split}: relative error {err:.2e}"


@gpu
def test_float16_norms_through_a_plan_and_the_dispatcher(gen):
    """A planned decode loop and the public op on a float16-norm cache; the float32-norm cache of the
    same vectors gives nearly the same output (the norms differ by their rounding only)."""
    needs_library()
    case = make_case(gen, dim=128, hq=32, hkv=8, block_size=16, ctx_lens=[900, 3000], k_bits=4, v_bits=3)
    exact = [a for a in on_cuda(case, torch.float16)]
    case = with_norms(case, torch.float16)
    want = sdpa_oracle(case)
    args = on_cuda(case, torch.float16)
    with dispatch.use_backend("auto"):
        assert dispatch.backend_for("paged_attention", checked(args)) == "cuda"
        assert relative_error(paged_attention(*args).cpu(), want) < TOL[torch.float16]
    plan = tq_cuda.PagedAttentionPlan(checked(args))
    assert plan.path == "tensor-core"
    got = plan.run(args[0], args[5], args[6]).cpu()
    assert relative_error(got, want) < TOL[torch.float16]
    assert relative_error(got, cuda_attention(*exact).cpu().double()) < 2e-3


@gpu
def test_the_shapes_it_is_built_for_take_the_tensor_core_kernel(gen):
    needs_library()
    for name, (dim, hq, hkv, block, ctx, kb, vb) in CASES.items():
        case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=[1], k_bits=kb, v_bits=vb)
        path = tq_cuda.paged_attention_path(checked(on_cuda(case, torch.float16)))
        assert path == ("tensor-core" if dim <= 256 else "generic"), name


@gpu
def test_long_context_and_explicit_scale(gen):
    needs_library()
    case = make_case(gen, dim=128, hq=32, hkv=8, block_size=16, ctx_lens=[5000, 4097], k_bits=4, v_bits=4)
    want = sdpa_oracle(case, scale=0.05)
    got = cuda_attention(*on_cuda(case, torch.float16)[:-2], 4, 4, 0.05).cpu()
    assert relative_error(got, want) < TOL[torch.float16]


@gpu
@pytest.mark.parametrize("kb,vb", [(4, 4), (5, 3)])
def test_out_of_range_table_entries_skip_their_tokens_and_context_is_clamped(gen, kb, vb):
    """docs/ops.md: on the GPU a block-table entry outside [0, N) skips that block's tokens and a
    context longer than the table is clamped to M * B; nothing is read out of bounds."""
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[60, 40], k_bits=kb, v_bits=vb,
                     extra_entries=0)
    n = case.caches[0].shape[0]
    tables = case.block_tables.clone()
    tables[0, 1] = n + 1000
    tables[1, 0] = -5
    lens = torch.tensor([60, 10_000], dtype=torch.int32)  # the second one past its 3-block table
    got = cuda_attention(*on_cuda(case, torch.float16)[:5], tables.cuda(), lens.cuda(),
                         *on_cuda(case, torch.float16)[7:]).cpu()
    b, m = 16, tables.shape[1]

    def kept(s, length):  # tokens whose table entry names a block of the cache
        return [int(tables[s, t // b]) * b + t % b for t in range(min(length, m * b)) if 0 <= tables[s, t // b] < n]

    slots = [kept(0, 60), kept(1, 10_000)]
    assert relative_error(got, oracle_over_slots(case, slots)) < TOL[torch.float16]


@gpu
def test_nan_is_never_hidden(gen):
    """Only a context of 0 tokens gives zeros; a NaN query gives NaN in its head's row."""
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[30, 0], k_bits=4, v_bits=4)
    args = on_cuda(case, torch.float16)
    args[0][0, 3, 5] = float("nan")
    got = cuda_attention(*args).cpu()
    assert got[0, 3].isnan().all()
    assert torch.isfinite(got[0, :3]).all() and (got[1] == 0).all()


@gpu
def test_value_norms_past_fp16_range_stay_finite(gen):
    """p * ||v|| above 65504 must not overflow an fp16 intermediate."""
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[1, 100, 33], k_bits=4, v_bits=4)
    k_codes, k_norms, v_codes, v_norms = case.caches
    # one token: p = 1, so p * ||v|| = 1e5; the outputs (<= 0.35 * 1e5) still fit fp16
    case.caches = (k_codes, k_norms, v_codes, torch.full_like(v_norms, 1e5))
    want = sdpa_oracle(case)
    got = cuda_attention(*on_cuda(case, torch.float16)).cpu()
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < TOL[torch.float16]


@gpu
@pytest.mark.parametrize("dim", [128, 96])
def test_non_contiguous_tables_and_misaligned_codes(gen, dim):
    """Codes one byte past an aligned start: the generic kernel takes them (the tensor-core kernel
    copies whole 16-byte / 4-byte words)."""
    needs_library()
    case = make_case(gen, dim=dim, hq=8, hkv=2, block_size=16, ctx_lens=[40, 70], k_bits=4, v_bits=4)
    want = sdpa_oracle(case)
    args = on_cuda(case, torch.float16)
    wide = torch.full((2, 2 * args[5].shape[1]), -3, dtype=torch.int32, device="cuda")
    wide[:, ::2] = args[5]
    args[5] = wide[:, ::2]  # a strided view of the table
    flat = torch.empty(args[1].numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = flat[1:].view(args[1].shape)  # contiguous, one byte past an aligned start
    shifted.copy_(args[1])
    args[1] = shifted
    assert tq_cuda.supports_paged_attention(checked(args))
    assert relative_error(cuda_attention(*args).cpu(), want) < TOL[torch.float16]


@gpu
def test_public_paged_attention_takes_it_and_triton_switch_skips_it(gen):
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[77, 300], k_bits=4, v_bits=4)
    args = on_cuda(case, torch.float16)
    direct = cuda_attention(*args)
    with dispatch.use_backend("auto"):
        assert dispatch.backend_for("paged_attention", checked(args)) == "cuda"
        assert torch.equal(paged_attention(*args), direct)
    with dispatch.use_backend("triton"):
        assert dispatch.backend_for("paged_attention", checked(args)) == "triton"
        via_triton = paged_attention(*args).cpu()
    assert relative_error(via_triton, sdpa_oracle(case)) < TOL[torch.float16]


@gpu
def test_captured_in_a_cuda_graph(gen):
    """The launch allocates nothing and synchronizes nothing: it replays from a CUDA graph."""
    needs_library()
    case = make_case(gen, dim=128, hq=32, hkv=8, block_size=16, ctx_lens=[900, 3000], k_bits=4, v_bits=4)
    args = on_cuda(case, torch.float16)
    a = checked(args)
    tq_cuda.paged_attention(a)  # warm-up: workspace and device constants exist before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tq_cuda.paged_attention(a)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tq_cuda.paged_attention(a)
    args[0].copy_(torch.randn(args[0].shape, generator=gen).half())
    graph.replay()
    torch.cuda.synchronize()
    case.query = args[0].cpu()
    assert relative_error(out.cpu(), sdpa_oracle(case)) < TOL[torch.float16]


# --- the key mean (key_mean, rope_inv_freq), against the float32 reference: fp16/bf16 queries at head
# dims 64/128/256 on the tensor cores, the rest on the generic kernel ----------------------------------

KEY_MEAN_CASES = {
    # name: dim, hq, hkv, block_size, context lengths, k_bits, v_bits
    "gqa1-d64-b16-k4v2": (64, 4, 4, 16, [0, 1, 15, 17], 4, 2),
    "gqa4-d128-b16-k3v4": (128, 8, 2, 16, [1, 33, 300, 0], 3, 4),
    "gqa8-d128-b32-k2v3": (128, 16, 2, 32, [640, 31, 1], 2, 3),
    "gqa8-d64-b8-k5v3": (64, 8, 1, 8, [129, 7, 8], 5, 3),
    "gqa12-d128-b16-k4v4": (128, 24, 2, 16, [100, 5], 4, 4),  # two head chunks per KV head
    "gqa6-d256-b32-k4v4": (256, 12, 2, 32, [1100, 33, 2], 4, 4),
    "gqa8-d64-b64-k4v4": (64, 16, 2, 64, [2000, 64, 65], 4, 4),
    "gqa4-d128-b24-k6v4": (128, 8, 2, 24, [500, 24, 25], 6, 4),  # blocks that are not a multiple of 16
    "gqa4-d50-b16-k3v5": (50, 8, 2, 16, [40, 3], 3, 5),  # D/2 odd, rows padded to 52
    "gqa2-d320-b16-k4v3": (320, 4, 2, 16, [70, 3], 4, 3),
}
# the generic kernel (float32 throughout); the tensor cores round the query, the centroids, the key
# mean's coefficients and its cos/sin table to fp16, as they do without the mean (TOL)
KEY_MEAN_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def key_mean_tolerance(path: str, dtype) -> float:
    return TOL[dtype] if path == "tensor-core" else KEY_MEAN_TOL[dtype]


def key_mean_path(dim: int, dtype) -> str:
    return "tensor-core" if dtype != torch.float32 and dim in (64, 128, 256) else "generic"


def key_mean_inputs(gen, hkv: int, dim: int, rate: float = 1.0):
    """A mean of about a key's size per KV head and RoPE rates rate * 10000^(-2j/D)."""
    key_mean = torch.randn(hkv, dim, generator=gen) * 1.5
    rope_inv_freq = rate * 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return key_mean, rope_inv_freq


def with_key_mean(case, dtype, key_mean, rope_inv_freq):
    """The reference's answer (float32 on the CPU) and the CUDA arguments, both with the key mean."""
    cpu_args = (*case.args(query=case.query.to(dtype)), 0.0)
    want = paged_attention_reference(*cpu_args, key_mean, rope_inv_freq)
    without = paged_attention_reference(*cpu_args)
    args = [*on_cuda(case, dtype), 0.0, key_mean.cuda(), rope_inv_freq.cuda()]
    return want, without, args


@gpu
@pytest.mark.parametrize("tokens_per_split", [0, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(KEY_MEAN_CASES))
def test_key_mean_matches_the_reference(gen, name, dtype, tokens_per_split):
    needs_library()
    dim, hq, hkv, block, ctx, kb, vb = KEY_MEAN_CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=ctx, k_bits=kb, v_bits=vb)
    want, without, args = with_key_mean(case, dtype, *key_mean_inputs(gen, hkv, dim))
    path = key_mean_path(dim, dtype)
    tol = key_mean_tolerance(path, dtype)
    assert relative_error(without, want.double()) > 5 * tol, "the key mean's term must show in the output"
    a = checked(args)
    assert tq_cuda.supports_paged_attention(a) and tq_cuda.paged_attention_path(a) == path
    got = tq_cuda.paged_attention(a, tokens_per_split=tokens_per_split)
    assert got.dtype == dtype and got.shape == case.query.shape
    got = got.cpu()
    assert torch.isfinite(got).all()
    assert (got[case.context_lens == 0] == 0).all(), "a context of 0 tokens gives zeros"
    err = relative_error(got, want.double())
    assert err < tol, f"{name} {dtype} split {tokens_per_split}: relative error {err:.2e}"


@gpu
@pytest.mark.parametrize("tokens_per_split", [0, 160])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["gqa1-d64-b16-k4v2", "gqa8-d128-b32-k2v3", "gqa4-d128-b24-k6v4", "gqa6-d256-b32-k4v4",
                                  "gqa4-d50-b16-k3v5", "gqa2-d320-b16-k4v3"])
def test_key_mean_with_float16_norms_matches_the_reference(gen, name, dtype, tokens_per_split):
    needs_library()
    dim, hq, hkv, block, ctx, kb, vb = KEY_MEAN_CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=ctx, k_bits=kb, v_bits=vb)
    case = with_norms(case, torch.float16)
    want, _, args = with_key_mean(case, dtype, *key_mean_inputs(gen, hkv, dim))
    path = key_mean_path(dim, dtype)
    a = checked(args)
    assert tq_cuda.supports_paged_attention(a) and tq_cuda.paged_attention_path(a) == path
    got = tq_cuda.paged_attention(a, tokens_per_split=tokens_per_split).cpu()
    assert torch.isfinite(got).all() and (got[case.context_lens == 0] == 0).all()
    err = relative_error(got, want.double())
    assert err < key_mean_tolerance(path, dtype), f"{name} {dtype} split {tokens_per_split}: relative error {err:.2e}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_mean_at_large_angles(gen, dtype):
    """Angles t * w_j past 1e5 (rates scaled up): accurate sines and cosines, as the reference's."""
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[2000, 1500], k_bits=4, v_bits=3)
    key_mean, rope_inv_freq = key_mean_inputs(gen, 2, 128, rate=100.0)
    assert float(rope_inv_freq[0]) * 1999 > 1e5
    want, without, args = with_key_mean(case, dtype, key_mean, rope_inv_freq)
    tol = key_mean_tolerance(key_mean_path(128, dtype), dtype)
    assert relative_error(without, want.double()) > 5 * tol
    got = cuda_attention(*args).cpu()
    assert relative_error(got, want.double()) < tol


@gpu
def test_key_mean_through_the_dispatcher_and_a_plan(gen):
    """The public op and a planned decode loop take the key mean on the CUDA backend."""
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[77, 300], k_bits=4, v_bits=4)
    want, _, args = with_key_mean(case, torch.float16, *key_mean_inputs(gen, 2, 128))
    with dispatch.use_backend("auto"):
        assert dispatch.backend_for("paged_attention", checked(args)) == "cuda"
        assert relative_error(paged_attention(*args).cpu(), want.double()) < TOL[torch.float16]
        plan = dispatch.plan_paged_attention(*args)
    assert isinstance(plan, tq_cuda.PagedAttentionPlan) and plan.path == "tensor-core"
    got = plan.run(args[0], args[5], args[6]).cpu()
    assert relative_error(got, want.double()) < TOL[torch.float16]


@gpu
def test_key_mean_is_refused_without_its_rates_or_with_an_odd_head_dim(gen):
    """The library's own checks (callers that skip the Python ones): both pointers or neither, D even;
    the workspace size does not depend on them. The key mean takes the tensor cores at D 128, the
    generic kernel at D 96 (the raw path has no key-mean term)."""
    needs_library()
    lib = tq_cuda._lib()
    case = make_case(gen, dim=96, hq=8, hkv=2, block_size=16, ctx_lens=[40], k_bits=4, v_bits=4)
    args = [*on_cuda(case, torch.float16), 0.0, *(t.cuda() for t in key_mean_inputs(gen, 2, 96))]
    call, _keep96 = tq_cuda._attention_call(checked(args), args[0].device)
    call.num_seqs, call.max_blocks = 1, args[5].shape[1]
    assert tq_cuda._plan(call, 0, str).tensor_cores == 0 and lib.tq_cuda_paged_attention_path(ctypes.byref(call)) == 0
    call.key_mean = call.rope_inv_freq = None
    assert tq_cuda._plan(call, 0, str).tensor_cores == 1
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[40], k_bits=4, v_bits=4)
    args = [*on_cuda(case, torch.float16), 0.0, *(t.cuda() for t in key_mean_inputs(gen, 2, 128))]
    call, _keep = tq_cuda._attention_call(checked(args), args[0].device)
    call.num_seqs, call.max_blocks = 1, args[5].shape[1]
    assert tq_cuda._plan(call, 0, str).tensor_cores == 1 and lib.tq_cuda_paged_attention_path(ctypes.byref(call)) == 1
    with_mean = lib.tq_cuda_paged_attention_workspace(ctypes.byref(call))
    mean, freq = call.key_mean, call.rope_inv_freq
    call.key_mean = call.rope_inv_freq = None
    assert lib.tq_cuda_paged_attention_workspace(ctypes.byref(call)) == with_mean
    assert tq_cuda._plan(call, 0, str).tensor_cores == 1
    for key_mean, rope_inv_freq, dim in ((mean, None, 128), (None, freq, 128), (mean, freq, 127)):
        call.key_mean, call.rope_inv_freq, call.head_dim = key_mean, rope_inv_freq, dim
        with pytest.raises(ValueError, match="refused"):
            tq_cuda._plan(call, 0, str)


# The CUDA prefill (tq_cuda_paged_prefill: the decode attention over one row per query token) has no
# Python backend of its own: these tests call the launcher with the op's call struct.
_PrefillCall = abi.ctypes_struct(ops.PAGED_PREFILL)


def prefill_lib():
    lib = tq_cuda._lib()
    lib.tq_cuda_paged_prefill_workspace.restype, lib.tq_cuda_paged_prefill_workspace.argtypes = \
        ctypes.c_size_t, [ctypes.c_void_p]
    lib.tq_cuda_paged_prefill.restype, lib.tq_cuda_paged_prefill.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return lib


def cuda_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start, rotation,
                 k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None, rope_inv_freq=None):
    """tq_cuda_paged_prefill on CUDA tensors: out [T, Hq, D] in the query's dtype."""
    lib = prefill_lib()
    out = torch.empty_like(query)
    floats = [t.float().contiguous() if t is not None else None
              for t in (rotation, k_codebook, v_codebook, key_mean, rope_inv_freq)]
    call = _PrefillCall(
        query=query.data_ptr(), k_codes=k_codes.data_ptr(), k_norms=k_norms.data_ptr(), v_codes=v_codes.data_ptr(),
        v_norms=v_norms.data_ptr(), block_tables=block_tables.data_ptr(), context_lens=context_lens.data_ptr(),
        query_start=query_start.data_ptr(), **{name: t.data_ptr() if t is not None else None for name, t in zip(
            ("rotation", "k_codebook", "v_codebook", "key_mean", "rope_inv_freq"), floats)},
        out=out.data_ptr(), num_tokens=query.shape[0], num_q_heads=query.shape[1], head_dim=query.shape[2],
        num_blocks=k_codes.shape[0], block_size=k_codes.shape[1], num_kv_heads=k_codes.shape[2],
        num_seqs=block_tables.shape[0], max_blocks=block_tables.shape[1], k_bits=k_bits, v_bits=v_bits, scale=scale,
        dtype=tq_cuda._DTYPES[query.dtype], norm_dtype=tq_cuda._NORM_DTYPES[k_norms.dtype],
        stream=torch.cuda.current_stream().cuda_stream)
    nbytes = lib.tq_cuda_paged_prefill_workspace(ctypes.byref(call))
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=query.device)
    call.workspace, call.workspace_bytes = workspace.data_ptr(), workspace.numel()
    rc = lib.tq_cuda_paged_prefill(ctypes.byref(call))
    assert rc == 0, lib.tq_cuda_error_string(rc).decode()
    torch.cuda.synchronize()
    return out


PREFILL_CASES = {
    # name: dim, hq, hkv, block_size, context lengths, query rows per sequence, k_bits, v_bits
    "gqa1-d64-b16-k4v2": (64, 4, 4, 16, [0, 1, 17, 40], [0, 1, 5, 40], 4, 2),
    "gqa4-d128-b16-k3v4": (128, 8, 2, 16, [33, 300, 1], [33, 7, 1], 3, 4),
    "gqa8-d128-b32-k2v3": (128, 16, 2, 32, [100, 31], [20, 31], 2, 3),
    "gqa8-d64-b8-k5v3": (64, 8, 1, 8, [129, 8], [64, 8], 5, 3),
}


@gpu
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_with_key_mean_matches_the_reference(gen, name, dtype, norm_dtype):
    """Row j of sequence s sits at position context_lens[s] - n_s + j and sees the key mean's term at
    the positions of its sequence (the rows run as decode queries over the same tables); on caches
    with float32 and float16 norms."""
    needs_library()
    dim, hq, hkv, block, ctx, rows, kb, vb = PREFILL_CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=ctx, k_bits=kb, v_bits=vb)
    case = with_norms(case, norm_dtype)
    query = (torch.randn(sum(rows), hq, dim, generator=gen) * 2).to(dtype)
    query_start = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32)
    key_mean, rope_inv_freq = key_mean_inputs(gen, hkv, dim)
    cpu_args = (query, *case.caches, case.block_tables, case.context_lens, query_start, case.rotation,
                case.k_codebook, case.v_codebook, kb, vb, 0.0)
    want = paged_prefill_reference(*cpu_args, key_mean, rope_inv_freq).double()
    tol = KEY_MEAN_TOL[dtype]
    assert relative_error(paged_prefill_reference(*cpu_args), want) > 5 * tol
    cuda_args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in cpu_args]
    got = cuda_prefill(*cuda_args, key_mean.cuda(), rope_inv_freq.cuda()).cpu()
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < tol
    # and without the key mean the launcher still gives the plain prefill
    plain = cuda_prefill(*cuda_args).cpu()
    assert relative_error(plain, paged_prefill_reference(*cpu_args).double()) < TOL[dtype]


@gpu
def test_float16_norms_off_a_4_byte_boundary_take_the_generic_kernel(gen):
    """The tensor-core kernel copies float16 norms as the 4-byte words that hold them: norms that start
    2 bytes past an aligned address take the generic kernel, with the same answer."""
    needs_library()
    case = with_norms(make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[40, 70], k_bits=4, v_bits=3),
                      torch.float16)
    want = sdpa_oracle(case)
    args = on_cuda(case, torch.float16)
    for i in (2, 4):
        flat = torch.empty(args[i].numel() + 1, dtype=torch.float16, device="cuda")
        shifted = flat[1:].view(args[i].shape)  # contiguous, 2 bytes past an aligned start
        shifted.copy_(args[i])
        args[i] = shifted
    a = checked(args)
    call, _keep = tq_cuda._attention_call(a, args[0].device)
    call.num_seqs, call.max_blocks = a.num_seqs, a.max_blocks
    assert tq_cuda._plan(call, 0, str).tensor_cores == 0
    assert relative_error(cuda_attention(*args).cpu(), want) < TOL[torch.float16]


def test_norms_of_two_types_are_refused():
    """Keys and values share the cache's norm type (TN): the checks name the one that differs."""
    case = make_case(torch.Generator().manual_seed(0), dim=64, hq=4, hkv=2, block_size=16, ctx_lens=[5], k_bits=4,
                     v_bits=4)
    k_codes, k_norms, v_codes, v_norms = case.caches
    args = list(case.args())
    args[2] = k_norms.half()  # k_norms float16, v_norms float32
    with pytest.raises(ValueError, match=r"v_norms\.dtype=torch\.float32, expected torch\.float16 like k_norms"):
        check_paged_attention(*args)
    with pytest.raises(ValueError, match=r"v_norms\.dtype"):
        check_cache_update(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.zeros(1, dtype=torch.int64), k_codes,
                           k_norms.half(), v_codes, v_norms, case.rotation, case.k_codebook, case.v_codebook, 4, 4)


@gpu
def test_a_cache_norm_type_the_library_does_not_take_is_refused(gen):
    """The library's own check (callers that skip the Python ones): norm_dtype 0 or 1, else
    TQ_CUDA_BAD_ARGUMENT from planning and from the prefill, nothing launched."""
    needs_library()
    case = with_norms(make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[40], k_bits=4, v_bits=4),
                      torch.float16)
    args = on_cuda(case, torch.float16)
    call, _keep = tq_cuda._attention_call(checked(args), args[0].device)
    call.num_seqs, call.max_blocks = 1, args[5].shape[1]
    assert call.norm_dtype == 1 and tq_cuda._plan(call, 0, str).tensor_cores == 1
    for bad in (2, -1, 7):
        call.norm_dtype = bad
        with pytest.raises(ValueError, match="refused"):
            tq_cuda._plan(call, 0, str)
    prefill = _PrefillCall(num_tokens=1, num_q_heads=8, head_dim=128, num_blocks=1, block_size=16, num_kv_heads=2,
                           num_seqs=1, max_blocks=1, k_bits=4, v_bits=4, dtype=1, norm_dtype=2)
    assert prefill_lib().tq_cuda_paged_prefill(ctypes.byref(prefill)) == tq_cuda._BAD_ARGUMENT


def test_cpu_tensors_are_not_taken(gen):
    case = make_case(gen, dim=64, hq=4, hkv=1, block_size=16, ctx_lens=[5], k_bits=4, v_bits=4)
    args = check_paged_attention(*case.args())
    assert not tq_cuda.supports_paged_attention(args)
    assert dispatch.backend_for("paged_attention", args) == "reference"


def test_library_env_var_must_name_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TQ_DEPLOY_CUDA_LIBRARY", str(tmp_path / "nowhere.so"))
    with pytest.raises(library.NativeLibraryNotFoundError, match="TQ_DEPLOY_CUDA_LIBRARY.*nowhere.so"):
        tq_cuda.library_path()
