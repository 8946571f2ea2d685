"""The tensor-core CUDA paged attention (libtq_deploy_cuda.so, tq_deploy.cuda) against an
independent float64 oracle (tests/test_paged.py: every cached vector decoded as
norm * (c[idx] @ Pi), torch SDPA per sequence).

Fresh random caches each run; odd shapes: context 1, partial last blocks, a context of exactly one
block, a context that is a multiple of the split, GQA 1/4/8, D 64/128/256, block sizes 16/32,
k_bits != v_bits, forced tiny splits (many partials through the merge kernel).

Tolerance: norm-wise relative error 5e-3 (fp16 centroids, fp16 P * ||v||, fp32 accumulation), the
Triton kernel's bound.
"""

from __future__ import annotations

import pytest
import torch

from test_paged import make_case, sdpa_oracle
from tq_deploy import cuda as tq_cuda
from tq_deploy import dispatch
from tq_deploy.dispatch import paged_attention
from tq_deploy.reference.checks import check_paged_attention
from tq_deploy.runtime import library

gpu = pytest.mark.gpu
TOL = 5e-3


def needs_library():
    if not tq_cuda.available():
        pytest.skip(tq_cuda.unavailable_reason())


def cuda_attention(*args, **knobs):
    """The CUDA backend on checked arguments (the dispatcher's route, without the dispatch)."""
    return tq_cuda.paged_attention(check_paged_attention(*args, check_data=False), **knobs)


def supported(args) -> bool:
    return tq_cuda.supports_paged_attention(check_paged_attention(*args, check_data=False))


def on_cuda(case, dtype):
    args = case.args(query=case.query.to(dtype))
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


CASES = {
    # name: dim, hq, hkv, block_size, context lengths, k_bits, v_bits
    "gqa1-d64-b16": (64, 4, 4, 16, [1, 15, 17, 16], 4, 4),
    "gqa4-d128-b32": (128, 8, 2, 32, [31, 33, 1, 300], 4, 2),
    "gqa8-d256-b16": (256, 8, 1, 16, [700, 16, 0, 5], 2, 4),
    "gqa8-d128-b16": (128, 16, 2, 16, [640, 1, 32], 2, 2),
    "gqa4-d64-b32": (64, 8, 2, 32, [17, 64, 15, 1, 400], 2, 2),
    "gqa1-d256-b32": (256, 2, 2, 32, [65, 1], 4, 2),
    "gqa2-d128-b16": (128, 4, 2, 16, [129, 2], 4, 4),
    "gqa8-d64-b16": (64, 8, 1, 16, [48, 3], 4, 4),
}


@gpu
@pytest.mark.parametrize("tokens_per_split", [0, 16, 48])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_float64_oracle(gen, name, dtype, tokens_per_split):
    needs_library()
    dim, hq, hkv, block, ctx, kb, vb = CASES[name]
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=ctx, k_bits=kb, v_bits=vb)
    case.query = case.query.to(dtype)
    want = sdpa_oracle(case)
    got = cuda_attention(*on_cuda(case, dtype), tokens_per_split=tokens_per_split)
    assert got.dtype == dtype and got.shape == case.query.shape
    got = got.cpu()
    assert torch.isfinite(got).all()
    assert (got[case.context_lens == 0] == 0).all(), "a context of 0 tokens gives zeros"
    err = relative_error(got, want)
    assert err < TOL, f"{name} {dtype} split {tokens_per_split}: relative error {err:.2e}"


@gpu
def test_long_context_and_explicit_scale(gen):
    needs_library()
    case = make_case(gen, dim=128, hq=32, hkv=8, block_size=16, ctx_lens=[5000, 4097], k_bits=4, v_bits=4)
    want = sdpa_oracle(case, scale=0.05)
    got = cuda_attention(*on_cuda(case, torch.float16)[:-2], 4, 4, 0.05).cpu()
    assert relative_error(got, want) < TOL


@gpu
def test_public_paged_attention_takes_it_and_triton_switch_skips_it(gen):
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[77, 300], k_bits=4, v_bits=4)
    args = on_cuda(case, torch.float16)
    direct = cuda_attention(*args)
    checked = check_paged_attention(*args, check_data=False)
    with dispatch.use_backend("auto"):
        assert dispatch.backend_for("paged_attention", checked) == "cuda"
        assert torch.equal(paged_attention(*args), direct)
    with dispatch.use_backend("triton"):
        assert dispatch.backend_for("paged_attention", checked) == "triton"
        via_triton = paged_attention(*args).cpu()
    assert relative_error(via_triton, sdpa_oracle(case)) < TOL


@gpu
@pytest.mark.parametrize("dim,hq,hkv,block,kb,vb", [(128, 8, 2, 16, 3, 4), (100, 4, 1, 16, 4, 4),
                                                    (64, 32, 2, 16, 4, 4), (64, 4, 1, 8, 4, 4)])
def test_shapes_it_does_not_take_go_elsewhere(gen, dim, hq, hkv, block, kb, vb):
    needs_library()
    case = make_case(gen, dim=dim, hq=hq, hkv=hkv, block_size=block, ctx_lens=[20], k_bits=kb, v_bits=vb)
    args = on_cuda(case, torch.float16)
    assert not supported(args)
    with pytest.raises(ValueError, match="expected"):
        cuda_attention(*args)
    assert relative_error(paged_attention(*args).cpu(), sdpa_oracle(case)) < 1.5e-2  # Triton or reference


@gpu
def test_misaligned_codes_go_elsewhere(gen):
    needs_library()
    case = make_case(gen, dim=128, hq=8, hkv=2, block_size=16, ctx_lens=[40], k_bits=4, v_bits=4)
    args = on_cuda(case, torch.float16)
    flat = torch.empty(args[1].numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = flat[1:].view(args[1].shape)  # contiguous, one byte past an aligned start
    shifted.copy_(args[1])
    args[1] = shifted
    assert not supported(args)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda_attention(*args)
    assert relative_error(paged_attention(*args).cpu(), sdpa_oracle(case)) < TOL


def test_cpu_tensors_are_not_taken(gen):
    case = make_case(gen, dim=64, hq=4, hkv=1, block_size=16, ctx_lens=[5], k_bits=4, v_bits=4)
    checked = check_paged_attention(*case.args())
    assert not tq_cuda.supports_paged_attention(checked)
    assert dispatch.backend_for("paged_attention", checked) == "reference"


def test_library_env_var_must_name_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TQ_DEPLOY_CUDA_LIBRARY", str(tmp_path / "nowhere.so"))
    with pytest.raises(library.NativeLibraryNotFoundError, match="TQ_DEPLOY_CUDA_LIBRARY.*nowhere.so"):
        tq_cuda.library_path()
