"""Triton Encode / Decode / CacheUpdate against the PyTorch reference.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (small
shapes, every bit width 1-8, head dim and dtype); with CUDA the same tests run
compiled on the GPU, plus the larger cases marked gpu. Inputs are fresh random
draws (the ``seed`` fixture of tests/conftest.py prints the seed of a failure).

Tolerances (tests/codes_match.py): codes must equal the reference's except for rounding ties (a
coordinate within float32 rounding of a boundary), which may take the
adjacent code: at most 1e-3 of the codes, one step, and only where the float64
rotated coordinate is within 1e-6 of that boundary. Norms to
1e-6 relative; decode (fp32 product) to 1e-5 relative (norm-wise). A cache with float16 norms stores
exactly its float32 norms rounded to nearest even, and the reference's up to rounding ties.
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

from codes_match import assert_codes_match  # noqa: E402
from tq_deploy.reference import checks  # noqa: E402
from tq_deploy.reference import codebook_boundaries, lloyd_max_codebook, make_rotation, unpack_codes  # noqa: E402
from tq_deploy.reference.paged import allocate_cache, cache_update_reference  # noqa: E402
from tq_deploy.reference.quantizer import decode_reference, encode_reference  # noqa: E402



def encode(x, rot, cb, bits):
    """The Triton encode on checked arguments (the dispatcher's route, without the dispatch)."""
    return tqt.encode.encode(checks.check_encode(x, rot, cb, bits))


def decode(codes, norms, rot, cb, bits, dtype=torch.float32):
    return tqt.decode.decode(checks.check_decode(codes, norms, rot, cb, bits, dtype))


def cache_update(*args):
    return tqt.encode.cache_update(checks.check_cache_update(*args))


CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _setup(dim, bits, seed):
    g = torch.Generator().manual_seed(seed)
    rot = make_rotation(dim, "haar", seed=seed).to(DEV)
    cb = lloyd_max_codebook(dim, bits).to(DEV)
    return g, rot, cb


DIMS = (32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# every (dim, dtype) at 1-4 bits; at 5-8 bits every dim and every dtype once per width
ENCODE_CASES = ([(dim, bits, dtype) for dim in DIMS for bits in (1, 2, 3, 4) for dtype in DTYPES]
                + [(dim, bits, DTYPES[(i + bits) % 3]) for bits in (5, 6, 7, 8) for i, dim in enumerate(DIMS)])


@pytest.mark.parametrize("dim,bits,dtype", ENCODE_CASES)
def test_encode_matches_reference(dim, bits, dtype, seed):
    g, rot, cb = _setup(dim, bits, seed=seed)
    x = (torch.randn(37, dim, generator=g) * 3).to(dtype).to(DEV)
    x[5] = 0  # zero vector: norm 0, y = 0
    codes, norms = encode(x, rot, cb, bits)
    want_codes, want_norms = encode_reference(x.cpu(), rot.cpu(), cb.cpu(), bits)
    assert codes.dtype == torch.uint8 and codes.shape == want_codes.shape
    assert_codes_match(codes, want_codes, bits, dim, x=x, rot=rot, cb=cb)
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=1e-6)


def test_encode_extreme_norms(seed):
    """fp32 rows of 1e20s and 1e-30s: their squares overflow and underflow fp32, their norms and
    codes must not (the norm is taken of x / max|x|)."""
    g, rot, cb = _setup(64, 4, seed=seed)
    x = torch.randn(6, 64, generator=g)
    x[:3] *= torch.tensor([1e20, 3e-30, 1e30])[:, None]
    x = x.to(DEV)
    codes, norms = encode(x, rot, cb, 4)
    want_codes, want_norms = encode_reference(x.cpu(), rot.cpu(), cb.cpu(), 4)
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=0)
    assert_codes_match(codes, want_codes, 4, 64, x=x, rot=rot, cb=cb)


def test_encode_leading_dims_and_strided_input():
    dim, bits = 64, 4
    g, rot, cb = _setup(dim, bits, seed=3)
    base = torch.randn(2, 3, 5, 2 * dim, generator=g).half().to(DEV)
    x = base[..., ::2]  # non-contiguous last dim
    codes, norms = encode(x, rot, cb, bits)
    want_codes, want_norms = encode_reference(x.cpu(), rot.cpu(), cb.cpu(), bits)
    assert codes.shape == (2, 3, 5, 32) and norms.shape == (2, 3, 5)
    assert_codes_match(codes, want_codes, bits, dim, x=x, rot=rot, cb=cb)
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", DIMS)
def test_decode_matches_reference(dim, bits, seed):
    g, rot, cb = _setup(dim, bits, seed=seed)
    p = (dim * bits + 7) // 8
    codes = torch.randint(0, 256, (3, 7, p), generator=g, dtype=torch.uint8)
    norms = torch.rand(3, 7, generator=g) * 5
    want = decode_reference(codes, norms, rot.cpu(), cb.cpu(), bits)
    got = decode(codes.to(DEV), norms.to(DEV), rot, cb, bits)
    assert got.dtype == torch.float32 and got.shape == (3, 7, dim)
    err = (got.cpu() - want).norm() / want.norm()
    assert err < 1e-5, f"decode relative error {err:.2e}"
    half = decode(codes.to(DEV), norms.to(DEV), rot, cb, bits, dtype=torch.float16)
    assert half.dtype == torch.float16


CACHE_UPDATE_CASES = (
    [(dim, kb, vb, page, dtype) for dim, kb, vb, page in [(64, 4, 2, 16), (128, 3, 4, 32), (32, 2, 3, 16), (256, 4, 4, 16)]
     for dtype in DTYPES]
    # 5-8 bits, keys and values of different widths, each width as key and as value
    + [(64, 5, 8, 64, torch.float16), (128, 7, 6, 32, torch.bfloat16), (32, 8, 1, 16, torch.float32),
       (256, 6, 5, 16, torch.float16), (64, 3, 7, 16, torch.float32)]
)


def _garbage_cache(g, n, page, hkv, dim, k_bits, v_bits, norm_dtype=torch.float32):
    """A reference cache full of garbage that slots not written must keep, and its device copy."""
    ref = allocate_cache(n, page, hkv, dim, k_bits, v_bits, norm_dtype=norm_dtype)
    for tensor in ref.tensors():
        if tensor.dtype == torch.uint8:
            tensor.copy_(torch.randint(0, 256, tensor.shape, generator=g, dtype=torch.uint8))
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=g))
    return ref, [x.clone().to(DEV) for x in ref.tensors()]


def _assert_cache_equal(ours, ref, dim, k_bits, v_bits):
    kc, kn, vc, vn = (x.cpu() for x in ours)
    assert_codes_match(kc.reshape(-1, kc.shape[-1]), ref.k_codes.reshape(-1, kc.shape[-1]), k_bits, dim, "k")
    assert_codes_match(vc.reshape(-1, vc.shape[-1]), ref.v_codes.reshape(-1, vc.shape[-1]), v_bits, dim, "v")
    torch.testing.assert_close(kn, ref.k_norms, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vn, ref.v_norms, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim,k_bits,v_bits,page,dtype", CACHE_UPDATE_CASES)
def test_cache_update_matches_reference(dim, k_bits, v_bits, page, dtype, seed):
    g, rot, _ = _setup(dim, k_bits, seed=seed)
    kcb = lloyd_max_codebook(dim, k_bits)
    vcb = lloyd_max_codebook(dim, v_bits)
    n, hkv, t = 5, 2, 23
    ref, ours = _garbage_cache(g, n, page, hkv, dim, k_bits, v_bits)
    slots = torch.randperm(n * page, generator=g)[:t]
    slots[[2, 7, 11]] = -1  # padding tokens are skipped
    key = torch.randn(t, hkv, dim, generator=g).to(dtype)
    value = (torch.randn(t, hkv, dim, generator=g) * 4).to(dtype)
    cache_update_reference(key, value, slots, *ref.tensors(), rot.cpu(), kcb, vcb, k_bits, v_bits)
    out = cache_update(key.to(DEV), value.to(DEV), slots.to(DEV), *ours, rot, kcb.to(DEV), vcb.to(DEV),
                           k_bits, v_bits)
    assert all(a is b for a, b in zip(out, ours)), "cache_update must return the tensors it updated in place"
    _assert_cache_equal(ours, ref, dim, k_bits, v_bits)


def test_cache_update_writes_the_first_and_last_slot(seed):
    """Slot 0 (row 0 of every cache tensor) and slot N*B-1 are real slots; a random permutation
    of the slots names slot 0 only now and then."""
    dim, k_bits, v_bits, page, n, hkv = 64, 6, 3, 16, 3, 2
    g, rot, _ = _setup(dim, k_bits, seed=seed)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    ref, ours = _garbage_cache(g, n, page, hkv, dim, k_bits, v_bits)
    before = [x.clone() for x in ref.tensors()]
    slots = torch.tensor([0, -1, n * page - 1, 5])
    key = torch.randn(4, hkv, dim, generator=g)
    value = torch.randn(4, hkv, dim, generator=g)
    cache_update_reference(key, value, slots, *ref.tensors(), rot.cpu(), kcb, vcb, k_bits, v_bits)
    assert not torch.equal(before[1][0, 0], ref.k_norms[0, 0]), "the case must overwrite slot 0"
    cache_update(key.to(DEV), value.to(DEV), slots.to(DEV), *ours, rot, kcb.to(DEV), vcb.to(DEV), k_bits, v_bits)
    _assert_cache_equal(ours, ref, dim, k_bits, v_bits)


def _assert_half_norms_match(got, want, want_f32):
    """float16 norms equal the reference's, but where the two float32 norms (equal to 1e-6 relative,
    as test_cache_update_matches_reference checks) fall either side of a float16 rounding midpoint:
    there the neighbour one float16 step away is allowed."""
    got, want, want_f32 = got.cpu().reshape(-1), want.reshape(-1), want_f32.reshape(-1)
    diff = got != want
    if diff.any():
        pair = torch.stack([got[diff], want[diff]]).float()
        assert torch.isfinite(pair).all(), "an infinite float16 norm differs from the reference's"
        step = (pair[0] - pair[1]).abs()
        assert (step <= pair.abs().amax(0) * 2**-10).all(), "a float16 norm differs by more than one step"
        midpoint = pair.mean(0)
        assert ((want_f32[diff] - midpoint).abs() <= 1e-6 * midpoint).all(), "a differing norm is no rounding tie"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's +inf norm
@pytest.mark.parametrize("dim,k_bits,v_bits,dtype", [(64, 4, 2, torch.float16), (128, 3, 6, torch.bfloat16),
                                                     (32, 8, 1, torch.float32)])
def test_cache_update_float16_norms(dim, k_bits, v_bits, dtype, seed):
    """A cache with float16 norms: the codes are those of a float32-norm cache (chosen with the
    float32 norm) and each norm is the float32 one rounded to nearest even, exactly; the reference
    stores the same (up to rounding ties of the two float32 norms). One value norm is past
    float16's range (stored +inf) and one key norm lies in [65504, 65520) for float32 keys
    (rounded down to 65504, not to inf)."""
    g, rot, _ = _setup(dim, k_bits, seed=seed)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    n, page, hkv, t = 4, 16, 2, 23
    ref, ours = _garbage_cache(g, n, page, hkv, dim, k_bits, v_bits, norm_dtype=torch.float16)
    ref_f32 = allocate_cache(n, page, hkv, dim, k_bits, v_bits)
    wide = [x.clone() if x.dtype == torch.uint8 else x.float() for x in ours]  # the same cache, float32 norms
    slots = torch.randperm(n * page, generator=g)[:t]
    slots[[2, 7]] = -1
    key = torch.randn(t, hkv, dim, generator=g)
    value = torch.randn(t, hkv, dim, generator=g) * 4
    value[5, 1] = 20000.0  # norm 20000 * sqrt(D) > 65504 in every input dtype
    key[9, 0] = 0.0
    key[9, 0, 3] = 65512.0  # one coordinate: the norm is exactly |x| (fp16 input: 65504; bf16: 65536, inf)
    key, value = key.to(dtype), value.to(dtype)
    args = (rot.cpu(), kcb, vcb, k_bits, v_bits)
    cache_update_reference(key, value, slots, *ref.tensors(), *args)
    cache_update_reference(key, value, slots, *ref_f32.tensors(), *args)
    dev = (key.to(DEV), value.to(DEV), slots.to(DEV))
    dev_args = (rot, kcb.to(DEV), vcb.to(DEV), k_bits, v_bits)
    cache_update(*dev, *ours, *dev_args)
    cache_update(*dev, *wide, *dev_args)
    assert ours[1].dtype == torch.float16 and ours[3].dtype == torch.float16
    assert torch.isinf(ours[3].view(-1, hkv)[slots[5], 1]), "a norm past 65504 is stored as +inf"
    if dtype != torch.bfloat16:
        assert ours[1].view(-1, hkv)[slots[9], 0] == 65504.0
    for half, full in ((ours[1], wide[1]), (ours[3], wide[3])):
        assert torch.equal(half, full.to(torch.float16)), "float16 norms are the float32 norms rounded to nearest even"
    for half, full in ((ours[0], wide[0]), (ours[2], wide[2])):
        assert torch.equal(half, full), "the codes do not depend on the norms' storage type"
    kc, vc = ours[0].cpu(), ours[2].cpu()
    assert_codes_match(kc.reshape(-1, kc.shape[-1]), ref.k_codes.reshape(-1, kc.shape[-1]), k_bits, dim, "k")
    assert_codes_match(vc.reshape(-1, vc.shape[-1]), ref.v_codes.reshape(-1, vc.shape[-1]), v_bits, dim, "v")
    written = torch.zeros(n * page, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    for got, want, want_f32 in ((ours[1], ref.k_norms, ref_f32.k_norms), (ours[3], ref.v_norms, ref_f32.v_norms)):
        _assert_half_norms_match(got.view(-1, hkv)[written.to(got.device)], want.view(-1, hkv)[written],
                                 want_f32.view(-1, hkv)[written])
        assert torch.equal(got.cpu().view(-1, hkv)[~written], want.view(-1, hkv)[~written]), "an unwritten slot changed"


def _four_squares(m: int) -> tuple[int, int, int, int]:
    """Non-negative a, b, c, d with a^2 + b^2 + c^2 + d^2 = m (Lagrange: one always exists)."""
    for a in range(math.isqrt(m), -1, -1):
        for b in range(math.isqrt(m - a * a), -1, -1):
            for c in range(math.isqrt(m - a * a - b * b), -1, -1):
                rest = m - a * a - b * b - c * c
                d = math.isqrt(rest)
                if d * d == rest:
                    return a, b, c, d
    raise AssertionError(m)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_encode_ties_take_the_lower_code(bits):
    """A coordinate exactly on a boundary takes the lower code (docs/ops.md, "Tie rule").

    Random inputs almost never land on a boundary, so this builds them: centroids at the odd
    multiples of 1/K put every boundary on a multiple of 2/K, the identity rotation leaves y =
    x / ||x||, and row i is (n_i, a, b, c, d, 0, ...) / K with n_i / K the i-th boundary and
    n_i^2 + a^2 + b^2 + c^2 + d^2 = K^2, so that ||x|| = 1 and y is computed without rounding in
    every input dtype (integers up to 256 over a power of two are exact in bf16 too). Every
    boundary is hit once, so a comparison that lets a tie through at any level of the search
    moves some code up."""
    k, dim = 2**bits, 32
    cb = ((torch.arange(k) * 2 - (k - 1)).double() / k).float().to(DEV)
    rot = torch.eye(dim).to(DEV)
    rows = torch.zeros(k - 1, dim, dtype=torch.float64)
    for i in range(k - 1):
        num = 2 * i + 2 - k  # boundary i = (c_i + c_{i+1}) / 2 = num / K
        rows[i, 0] = num
        rows[i, 1:5] = torch.tensor(_four_squares(k * k - num * num), dtype=torch.float64)
    rows /= k
    assert torch.equal(rows[:, 0].float(), codebook_boundaries(cb.cpu()))
    for dtype in DTYPES:
        x = rows.to(dtype)
        assert torch.equal(x.double(), rows), "the inputs must be exact in the dtype"
        codes, norms = encode(x.to(DEV), rot, cb, bits)
        want_codes, want_norms = encode_reference(x, rot.cpu(), cb.cpu(), bits)
        got = unpack_codes(codes.cpu(), bits, dim).long()
        assert torch.equal(norms.cpu(), torch.ones(k - 1)) and torch.equal(want_norms, torch.ones(k - 1))
        assert torch.equal(got[:, 0], torch.arange(k - 1)), f"{dtype}: a tie must take the lower code"
        assert torch.equal(got, unpack_codes(want_codes, bits, dim).long()), f"{dtype}: codes differ from the reference"


def test_bad_arguments_name_the_argument():
    rot = make_rotation(64).to(DEV)
    cb = lloyd_max_codebook(64, 4).to(DEV)
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises(ValueError, match="bits"):
        encode(x, rot, cb, 9)
    with pytest.raises(ValueError, match="codebook"):
        encode(x, rot, cb, 3)


def test_shapes_the_kernels_do_not_take_are_refused_by_supports():
    x48 = torch.randn(4, 48, device=DEV)
    args = checks.check_encode(x48, make_rotation(48).to(DEV), lloyd_max_codebook(48, 4).to(DEV), 4)
    assert tqt.encode.supports_encode(args) is False  # head dim 48: the dispatcher runs the reference
    ok = checks.check_encode(torch.randn(4, 64, device=DEV), make_rotation(64).to(DEV),
                             lloyd_max_codebook(64, 4).to(DEV), 4)
    assert tqt.encode.supports_encode(ok) is True


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_encode_large_on_gpu(bits, dtype):
    dim = 128
    g, rot, cb = _setup(dim, bits, seed=bits)
    x = torch.randn(200_003, dim, generator=g).to(dtype).to(DEV)
    codes, norms = encode(x, rot, cb, bits)
    want_codes, want_norms = encode_reference(x.float(), rot, cb, bits)  # reference on the GPU, fp32
    assert_codes_match(codes, want_codes, bits, dim, x=x, rot=rot, cb=cb)
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=1e-5)
    back = decode(codes, norms, rot, cb, bits)
    want_back = decode_reference(codes, norms, rot, cb, bits)
    assert ((back - want_back).norm() / want_back.norm()) < 1e-5
