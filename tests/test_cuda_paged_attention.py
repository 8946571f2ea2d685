"""The CUDA paged attention (libtq_deploy_cuda.so, tq_deploy.cuda) against an independent float64
oracle (tests/test_paged.py: every cached vector decoded as norm * (c[idx] @ Pi), torch SDPA per
sequence).

Fresh random caches each run (every slot holds some vector, unused table entries hold garbage);
odd shapes: context 0/1, partial last blocks, exactly one block, GQA 1/4/6/8 and 12/16/32 (query
heads in chunks of 8), D 33/50/64/72/80/96/100/128/256/320, blocks 1/8/16/24/32/40/64 (tiles
across blocks), k_bits != v_bits over 1-8 bits (packed rows that start inside a word), fp32/fp16/
bf16 queries, forced tiny splits (many partials through the merge). Both kernels: the tensor-core
one (packed layout for D 64/128/256, widened from any width for other D up to 256) and the generic
one (larger D, misaligned codes).

Tolerance: norm-wise relative error 5e-3 (fp16 centroids and q_rot in the tensor-core kernel,
fp32 accumulation); 1e-2 for bf16 queries (the output is rounded to bf16).
"""

from __future__ import annotations

import pytest
import torch

from test_paged import make_case, oracle_over_slots, sdpa_oracle
from tq_deploy import cuda as tq_cuda
from tq_deploy import dispatch
from tq_deploy.dispatch import paged_attention
from tq_deploy.reference.checks import check_paged_attention
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


def test_cpu_tensors_are_not_taken(gen):
    case = make_case(gen, dim=64, hq=4, hkv=1, block_size=16, ctx_lens=[5], k_bits=4, v_bits=4)
    args = check_paged_attention(*case.args())
    assert not tq_cuda.supports_paged_attention(args)
    assert dispatch.backend_for("paged_attention", args) == "reference"


def test_library_env_var_must_name_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TQ_DEPLOY_CUDA_LIBRARY", str(tmp_path / "nowhere.so"))
    with pytest.raises(library.NativeLibraryNotFoundError, match="TQ_DEPLOY_CUDA_LIBRARY.*nowhere.so"):
        tq_cuda.library_path()
