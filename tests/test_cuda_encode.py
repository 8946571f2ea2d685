"""The CUDA encode, decode and cache update (libtq_deploy_cuda.so, tq_deploy.cuda) against the
PyTorch reference, on fresh random inputs: every bit width 1-8, fp32/fp16/bf16 inputs, the
tensor-core encode (D 64/128, aligned rows) and the generic one (other D, misaligned rows),
slots that skip (-1, past the cache), duplicate slots (the last writer wins), slot 0, and
garbage in the slots nobody writes; caches with float32 and float16 norms.

Tolerances (tests/codes_match.py): codes equal up to rounding ties; norms to 1e-6 relative
(float16 cache norms: the GPU's float32 norms rounded to nearest even exactly, the reference's to
one float16 step, where the two float32 norms straddle a rounding boundary); decode to 1e-5
relative (norm-wise).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from codes_match import assert_codes_match
from tq_deploy import cuda as tq_cuda
from tq_deploy import dispatch
from tq_deploy.reference import checks, lloyd_max_codebook, make_rotation
from tq_deploy.reference.paged import allocate_cache, cache_update_reference
from tq_deploy.reference.quantizer import decode_reference, encode_reference

pytestmark = pytest.mark.gpu
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def needs_library():
    if not tq_cuda.available():
        pytest.skip(tq_cuda.unavailable_reason())


def setup(gen, dim, *bits):
    rot = make_rotation(dim, "haar", int(torch.randint(0, 10_000, (1,), generator=gen)))
    return rot, [lloyd_max_codebook(dim, b) for b in bits]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dim", [64, 128, 100, 256])
def test_encode_matches_reference(gen, dim, bits, dtype):
    rot, (cb,) = setup(gen, dim, bits)
    x = (torch.randn(300, dim, generator=gen) * torch.logspace(-3, 3, 300).unsqueeze(-1)).to(dtype)
    x[7] = 0  # a zero vector: norm 0, every coordinate 0
    codes, norms = tq_cuda.encode(checks.check_encode(x.cuda(), rot.cuda(), cb.cuda(), bits))
    want_codes, want_norms = encode_reference(x, rot, cb, bits)
    assert codes.dtype == torch.uint8 and codes.shape == want_codes.shape
    assert_codes_match(codes, want_codes, bits, dim, x=x.float(), rot=rot, cb=cb)
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=0)


def test_encode_extreme_norms_and_misaligned_rows(gen):
    """1e20s and 1e-30s give finite, nonzero norms; rows that start off a 16-byte boundary take
    the generic kernel and give the same codes."""
    rot, (cb,) = setup(gen, 128, 4)
    x = torch.randn(64, 128, generator=gen)
    x[:8] *= 1e20
    x[8:16] *= 1e-30
    flat = torch.empty(x.numel() + 1, device="cuda")
    shifted = flat[1:].view(x.shape)
    shifted.copy_(x.cuda())
    for source in (x.cuda(), shifted):
        codes, norms = tq_cuda.encode(checks.check_encode(source, rot.cuda(), cb.cuda(), 4))
        want_codes, want_norms = encode_reference(x, rot, cb, 4)
        assert torch.isfinite(norms).all() and (norms > 0).all()
        assert_codes_match(codes, want_codes, 4, 128, x=x, rot=rot, cb=cb)
        torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (4, 5, 8))
@pytest.mark.parametrize("dim", [64, 128])
def test_encode_crowded_codebook(gen, dim, bits, dtype):
    """Midpoints closer than the tensor-core kernel's lookup-table buckets (outer centroids at
    +-1 widen the table's range; three inner centroids 1e-5 apart put two midpoints in one
    bucket): the coordinates that land in such a bucket take the search among its midpoints."""
    rot, (cb,) = setup(gen, dim, bits)
    cb = cb.clone()
    cb[0], cb[-1] = -1.0, 1.0
    k = len(cb) // 2
    cb[k + 1], cb[k + 2] = cb[k] + 1e-5, cb[k] + 2e-5
    assert (cb[1:] > cb[:-1]).all()
    x = torch.randn(3000, dim, generator=gen).to(dtype)
    codes, norms = tq_cuda.encode(checks.check_encode(x.cuda(), rot.cuda(), cb.cuda(), bits))
    want_codes, want_norms = encode_reference(x, rot, cb, bits)
    assert_codes_match(codes, want_codes, bits, dim, x=x.float(), rot=rot, cb=cb)
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dim", [64, 128, 72])
def test_decode_matches_reference(gen, dim, bits, dtype):
    rot, (cb,) = setup(gen, dim, bits)
    p = (dim * bits + 7) // 8
    codes = torch.randint(0, 256, (3, 50, p), generator=gen, dtype=torch.uint8)
    norms = torch.rand(3, 50, generator=gen) * 5
    want = decode_reference(codes, norms, rot, cb, bits)
    got = tq_cuda.decode(checks.check_decode(codes.cuda(), norms.cuda(), rot.cuda(), cb.cuda(), bits, dtype))
    assert got.dtype == dtype and got.shape == (3, 50, dim)
    err = ((got.cpu().double() - want.double()).norm() / want.double().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-3), f"decode relative error {err:.2e}"


CACHE_CASES = {
    # name: dim, hkv, block_size, tokens, k_bits, v_bits
    "d64-h2-b16-k4v2": (64, 2, 16, 23, 4, 2),
    "d128-h8-b16-k6v4": (128, 8, 16, 40, 6, 4),
    "d128-h1-b32-k8v3": (128, 1, 32, 1, 8, 3),
    "d128-h8-b16-k4v4-step": (128, 8, 16, 8, 4, 4),  # a decode step: few tokens, duplicates checked inline
    "d256-h2-b64-k3v3": (256, 2, 64, 70, 3, 3),
    "d72-h3-b16-k5v7": (72, 3, 16, 19, 5, 7),
}


def assert_norms_close(got, want):
    """A float32 cache's norms to 1e-6 relative; a float16 cache's to one float16 step (2^-10 relative,
    2^-24 among subnormals): the GPU's and the reference's float32 norms may straddle a rounding
    boundary."""
    assert got.dtype == want.dtype
    if want.dtype == torch.float16:
        torch.testing.assert_close(got, want, rtol=2**-10, atol=2**-24)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_cache_update_matches_reference(gen, name, dtype, norm_dtype):
    dim, hkv, block, tokens, k_bits, v_bits = CACHE_CASES[name]
    rot, (kcb, vcb) = setup(gen, dim, k_bits, v_bits)
    n = 6
    ref = allocate_cache(n, block, hkv, dim, k_bits, v_bits, norm_dtype=norm_dtype)
    for tensor in ref.tensors():  # garbage that the slots nobody writes must keep
        if tensor.dtype == torch.uint8:
            tensor.copy_(torch.randint(0, 256, tensor.shape, generator=gen, dtype=torch.uint8))
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=gen))
    ours = [t.clone().cuda() for t in ref.tensors()]
    slots = torch.randperm(n * block, generator=gen)[:tokens]
    if tokens > 4:
        slots[0] = 0  # slot 0 is a real slot
        slots[1] = -1  # padding token
        slots[2] = n * block + 5  # past the cache: skipped on the GPU (docs/ops.md)
        slots[3] = slots[tokens - 1]  # a duplicate: the last writer wins
    key = (torch.randn(tokens, hkv, dim, generator=gen) * 3).to(dtype)
    value = torch.randn(tokens, hkv, dim, generator=gen).to(dtype)
    kept = slots < n * block  # the reference refuses a slot past the cache; the GPU skips it
    cache_update_reference(key[kept], value[kept], slots[kept], *ref.tensors(), rot, kcb, vcb, k_bits, v_bits)
    args = checks.check_cache_update(key.cuda(), value.cuda(), slots.cuda(), *ours, rot.cuda(), kcb.cuda(),
                                     vcb.cuda(), k_bits, v_bits, check_data=False)
    assert tq_cuda.supports_cache_update(args)
    tq_cuda.cache_update(args)
    want_kc, want_kn, want_vc, want_vn = ref.tensors()
    got_kc, got_kn, got_vc, got_vn = (t.cpu() for t in ours)
    assert_codes_match(got_kc.reshape(-1, got_kc.shape[-1]), want_kc.reshape(-1, want_kc.shape[-1]), k_bits, dim,
                       "k_codes")
    assert_codes_match(got_vc.reshape(-1, got_vc.shape[-1]), want_vc.reshape(-1, want_vc.shape[-1]), v_bits, dim,
                       "v_codes")
    assert got_kn.dtype == got_vn.dtype == norm_dtype
    assert_norms_close(got_kn, want_kn)
    assert_norms_close(got_vn, want_vn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 72])
def test_float16_cache_norms_are_the_float32_norms_rounded(gen, dim, dtype):
    """A float16 cache gets the codes of a float32 cache (chosen with the float32 norm) and its norms
    rounded to nearest even: +inf past 65504, float16 subnormals for tiny vectors. D 64/128: the
    tensor-core encode; 72: the generic one."""
    hkv, block, tokens, k_bits, v_bits, n = 2, 16, 40, 4, 3, 4
    rot, (kcb, vcb) = setup(gen, dim, k_bits, v_bits)
    key = torch.randn(tokens, hkv, dim, generator=gen) * 3
    key[5] = 1e4  # norm 1e4 * sqrt(D) > 65504: +inf in float16
    key[6] *= 1e-6  # norm near 1e-5: a float16 subnormal
    key, value = key.to(dtype), torch.randn(tokens, hkv, dim, generator=gen).to(dtype)
    slots = torch.randperm(n * block, generator=gen)[:tokens]
    got = {}
    for norm_dtype in (torch.float32, torch.float16):
        cache = [t.cuda() for t in allocate_cache(n, block, hkv, dim, k_bits, v_bits, norm_dtype=norm_dtype).tensors()]
        tq_cuda.cache_update(checks.check_cache_update(key.cuda(), value.cuda(), slots.cuda(), *cache, rot.cuda(),
                                                       kcb.cuda(), vcb.cuda(), k_bits, v_bits))
        got[norm_dtype] = [t.cpu() for t in cache]
    (kc32, kn32, vc32, vn32), (kc16, kn16, vc16, vn16) = got[torch.float32], got[torch.float16]
    assert kn16.dtype == vn16.dtype == torch.float16
    assert torch.equal(kc16, kc32) and torch.equal(vc16, vc32)
    assert torch.equal(kn16, kn32.half()) and torch.equal(vn16, vn32.half())
    rows = kn16.reshape(-1, hkv)
    assert torch.isinf(rows[slots[5]]).all() and torch.isfinite(kn32.reshape(-1, hkv)[slots[5]]).all()
    assert (rows[slots[6]] > 0).all() and (rows[slots[6]] < 2**-14).all()  # below float16's smallest normal
    ref = allocate_cache(n, block, hkv, dim, k_bits, v_bits, norm_dtype=torch.float16)
    cache_update_reference(key, value, slots, *ref.tensors(), rot, kcb, vcb, k_bits, v_bits)
    assert_norms_close(kn16, ref.k_norms)
    assert_norms_close(vn16, ref.v_norms)
    assert_codes_match(kc16.reshape(-1, kc16.shape[-1]), ref.k_codes.reshape(-1, kc16.shape[-1]), k_bits, dim)
    assert_codes_match(vc16.reshape(-1, vc16.shape[-1]), ref.v_codes.reshape(-1, vc16.shape[-1]), v_bits, dim)


def test_a_cache_norm_type_the_library_does_not_take_is_refused():
    """norm_dtype is TQ_FLOAT32 or TQ_FLOAT16; anything else is TQ_CUDA_BAD_ARGUMENT, nothing launched."""
    call = tq_cuda._CacheUpdateCall(num_tokens=1, num_kv_heads=1, head_dim=64, num_blocks=1, block_size=1, k_bits=4,
                                    v_bits=4, dtype=0, norm_dtype=2)
    assert tq_cuda._lib().tq_cuda_cache_update(ctypes.byref(call)) == tq_cuda._BAD_ARGUMENT


def test_dispatch_takes_cuda_unless_switched_off(gen):
    rot, (cb,) = setup(gen, 128, 4)
    x = torch.randn(5, 128, generator=gen).cuda()
    args = checks.check_encode(x, rot.cuda(), cb.cuda(), 4)
    with dispatch.use_backend("auto"):
        assert dispatch.backend_for("encode", args) == "cuda"
    with dispatch.use_backend("reference"):
        assert dispatch.backend_for("encode", args) == "reference"


def test_a_non_contiguous_cache_is_not_taken(gen):
    """An in-place update cannot write back through a copy: strided caches go elsewhere."""
    rot, (cb,) = setup(gen, 64, 4)
    cache = [t.cuda() for t in allocate_cache(4, 16, 2, 64, 4, 4).tensors()]
    cache[0] = torch.zeros(4, 16, 2, 64, dtype=torch.uint8, device="cuda")[..., :32]
    kv = torch.randn(3, 2, 64, device="cuda")
    args = checks.check_cache_update(kv, kv, torch.arange(3, device="cuda"), *cache, rot.cuda(), cb.cuda(),
                                     cb.cuda(), 4, 4)
    assert not tq_cuda.supports_cache_update(args)
