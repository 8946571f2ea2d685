"""TurboQuant_mse encode/decode (issue item 6, first half)."""

from __future__ import annotations

import math

import pytest
import torch

from tq_deploy.ops import packed_size
from tq_deploy.reference.codebook import expected_mse, lloyd_max_codebook, paper_bounds
from tq_deploy.reference.packing import unpack_codes
from tq_deploy.dispatch import decode, encode
from tq_deploy.reference.quantizer import TurboQuantMSE, decode_reference, encode_reference
from tq_deploy.reference.rotation import make_rotation

BITS = (1, 2, 3, 4)
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def independent_decode(codes, norms, rotation, codebook, bits, dim) -> torch.Tensor:
    """x_hat = norm * (c[idx] @ Pi) in float64, from the (separately tested) unpacker."""
    idx = unpack_codes(codes, bits, dim).long()
    return norms.double().unsqueeze(-1) * (codebook.double()[idx] @ rotation.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 100, 128, 256])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_encode_decode_types_shapes_and_error(dtype, dim, bits, gen, seed):
    q = TurboQuantMSE(dim, bits, seed=seed % 997)
    # 6,000 vectors: at 7-8 bits the few coordinates past the outermost centroid cost many times a
    # typical vector's error, so the mean error is heavy-tailed. Over 600 vectors it strayed past 25 %
    # of the expectation in 4 of 300 seeds (8 bits, D 64); over 6,000 by at most 5.6 % in 400.
    x = (torch.randn(3, 2000, dim, generator=gen) * 3).to(dtype)
    codes, norms = q.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 2000, packed_size(dim, bits))
    assert norms.dtype == torch.float32 and norms.shape == (3, 2000)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(x.float(), dim=-1), rtol=1e-6, atol=0)
    # The input is widened to float32 first: the codes equal those of x.float().
    codes32, norms32 = q.encode(x.float())
    assert torch.equal(codes, codes32) and torch.equal(norms, norms32)
    x_hat = q.decode(codes, norms)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape
    assert q.decode(codes, norms, dtype).dtype == dtype
    torch.testing.assert_close(x_hat.double(), independent_decode(codes, norms, q.rotation, q.codebook, bits, dim),
                               rtol=1e-5, atol=1e-5)
    # Relative error of non-unit vectors: same distortion as on the unit sphere.
    rel = ((x_hat - x.float()).pow(2).sum(-1) / x.float().pow(2).sum(-1)).mean()
    lower, upper = paper_bounds(bits)
    assert 0.6 * lower < float(rel) < 1.3 * upper
    assert abs(float(rel) - expected_mse(dim, bits)) < 0.15 * expected_mse(dim, bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_the_round_trip_in_input_dtype(dtype, gen):
    q = TurboQuantMSE(128, 3, seed=4)
    x = torch.randn(40, 128, generator=gen).to(dtype)
    x_hat = q.quantize(x)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    codes, norms = q.encode(x)
    torch.testing.assert_close(x_hat.float(), q.decode(codes, norms, dtype).float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_zero_vectors_decode_to_zero_and_do_not_disturb_other_rows(bits, gen):
    q = TurboQuantMSE(64, bits, seed=2)
    x = torch.randn(10, 64, generator=gen)
    x[[0, 3, 9]] = 0.0
    codes, norms = q.encode(x)
    assert torch.equal(norms[[0, 3, 9]], torch.zeros(3))
    x_hat = q.decode(codes, norms)
    assert torch.equal(x_hat[[0, 3, 9]], torch.zeros(3, 64))
    assert not torch.isnan(x_hat).any()
    # Nonzero rows encode exactly as they would alone.
    alone_codes, alone_norms = q.encode(x[[1, 2, 4]])
    assert torch.equal(codes[[1, 2, 4]], alone_codes) and torch.equal(norms[[1, 2, 4]], alone_norms)
    assert torch.equal(q.quantize(torch.zeros(2, 64)), torch.zeros(2, 64))


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_each_code_is_the_nearest_centroid(rotation, bits, gen, seed):
    dim = 128
    q = TurboQuantMSE(dim, bits, seed=seed % 991, rotation=rotation)
    x = torch.randn(200, dim, generator=gen)
    codes, _ = q.encode(x)
    idx = unpack_codes(codes, bits, dim).long()
    # Independent float64 computation of y = Pi x / ||x|| and the distance to every centroid.
    x64 = x.double()
    y = (x64 / x64.norm(dim=-1, keepdim=True)) @ q.rotation.double().T
    dist = (y.unsqueeze(-1) - q.codebook.double()).abs()  # [n, D, K]
    chosen = dist.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    # The chosen centroid is the nearest up to float32 rounding of y (ties near boundaries) ...
    assert float((chosen - dist.min(-1).values).max()) < 1e-5
    # ... and is exactly the argmin for all but a vanishing few coordinates.
    assert float((idx == dist.argmin(-1)).double().mean()) > 0.999


def test_value_exactly_on_a_boundary_takes_the_lower_code():
    """With Pi = I and ||x|| = 1 exactly, y = x; boundaries of [-.75, -.25, .25, .75] are -.5, 0, .5."""
    rotation = torch.eye(4)
    codebook = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    x = torch.tensor([[0.5, -0.5, 0.5, -0.5], [1.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 0.5]])
    codes, norms = encode_reference(x, rotation, codebook, 2)
    assert torch.equal(norms, torch.ones(3))
    # 0.5 has boundaries -0.5 and 0 strictly below -> 2; -0.5 has none -> 0; 0.0 has -0.5 -> 1; 1.0 -> 3.
    assert unpack_codes(codes, 2, 4).tolist() == [[2, 0, 2, 0], [3, 1, 1, 1], [0, 0, 0, 2]]


def test_scale_invariance_of_codes(gen):
    q = TurboQuantMSE(128, 4, seed=8)
    x = torch.randn(64, 128, generator=gen)
    codes, norms = q.encode(x)
    codes4, norms4 = q.encode(4 * x)  # a power of two: u = x/||x|| is bit-identical
    assert torch.equal(codes, codes4)
    torch.testing.assert_close(norms4, 4 * norms, rtol=0, atol=0)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_functional_api_matches_the_class_and_reference_on_cpu(bits, gen):
    dim = 64
    rotation, codebook = make_rotation(dim, "haar", 3), lloyd_max_codebook(dim, bits)
    x = torch.randn(5, 7, dim, generator=gen, dtype=torch.float16)
    codes, norms = encode(x, rotation, codebook, bits)
    ref_codes, ref_norms = encode_reference(x, rotation, codebook, bits)
    assert torch.equal(codes, ref_codes) and torch.equal(norms, ref_norms)
    q = TurboQuantMSE(dim, bits, seed=3)
    assert torch.equal(q.encode(x)[0], codes)
    assert torch.equal(decode(codes, norms, rotation, codebook, bits), decode_reference(codes, norms, rotation, codebook, bits))


def test_validate_reports_consistent_numbers(seed):
    q = TurboQuantMSE(64, 2, seed=5)
    r = q.validate(num_vectors=4000, seed=seed)
    assert set(r) >= {"bits", "head_dim", "mse", "mse_stderr", "theory", "lower_bound", "upper_bound", "within_bounds"}
    assert (r["bits"], r["head_dim"]) == (2, 64)
    assert (r["lower_bound"], r["upper_bound"]) == pytest.approx((1 / 16, math.sqrt(3) * math.pi / 2 / 16))
    assert r["theory"] == pytest.approx(expected_mse(64, 2))
    assert r["within_bounds"] == (r["lower_bound"] <= r["mse"] <= r["upper_bound"]) is True
    # Recompute the measurement independently on fresh unit vectors.
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(4000, 64, generator=g, dtype=torch.float64)
    u = (u / u.norm(dim=-1, keepdim=True)).float()
    mine = (q.quantize(u) - u).pow(2).sum(-1)
    assert abs(float(mine.mean()) - r["mse"]) < 6 * math.hypot(float(mine.std()) / math.sqrt(4000), r["mse_stderr"])
    assert 0 < r["mse_stderr"] < 0.01 * r["mse"]


def test_hadamard_quantizer_meets_the_same_bounds(seed):
    for bits in BITS:
        r = TurboQuantMSE(128, bits, seed=seed % 1000, rotation="hadamard").validate(num_vectors=4000, seed=seed)
        assert r["lower_bound"] <= r["mse"] <= r["upper_bound"], r


def test_compression_ratio_and_memory_report():
    q = TurboQuantMSE(128, 4)
    assert q.packed_size == 64 and q.bytes_per_vector() == 68
    assert q.compression_ratio() == pytest.approx(256 / 68)  # fp16: 128 * 2 bytes over 64 + 4
    assert TurboQuantMSE(128, 3).compression_ratio() == pytest.approx(256 / 52)
    assert TurboQuantMSE(128, 1).compression_ratio(source_bits=32) == pytest.approx(512 / 20)
    assert TurboQuantMSE(100, 3).packed_size == 38  # ceil(300 / 8)
    report = TurboQuantMSE(128, 3).memory_report(seq_len=1000, num_layers=32, num_kv_heads=8)
    vectors = 2 * 1000 * 32 * 8  # keys and values
    assert report["original_bytes"] == vectors * 128 * 2 == 131_072_000
    assert report["compressed_bytes"] == vectors * (48 + 4) == 26_624_000
    assert report["ratio"] == pytest.approx(256 / 52)
    assert (report["seq_len"], report["num_layers"], report["num_kv_heads"], report["head_dim"], report["bits"]) == (
        1000, 32, 8, 128, 3)


def test_quantizer_is_deterministic_from_its_seed(gen):
    x = torch.randn(8, 64, generator=gen)
    a, b, c = TurboQuantMSE(64, 3, seed=1), TurboQuantMSE(64, 3, seed=1), TurboQuantMSE(64, 3, seed=2)
    assert torch.equal(a.encode(x)[0], b.encode(x)[0])
    assert not torch.equal(a.encode(x)[0], c.encode(x)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ALL_BITS)
def test_reference_on_cuda_matches_cpu(bits, gen):
    from tq_deploy.dispatch import force_reference

    q = TurboQuantMSE(128, bits, seed=6)
    x = torch.randn(32, 128, generator=gen)
    cpu_codes, cpu_norms = q.encode(x)
    with force_reference():
        codes, norms = TurboQuantMSE(128, bits, seed=6, device="cuda").encode(x.cuda())
    assert codes.is_cuda
    # Different matmul kernels may flip a coordinate sitting on a boundary: allow a handful.
    mismatch = (unpack_codes(codes.cpu(), bits, 128) != unpack_codes(cpu_codes, bits, 128)).float().mean()
    assert float(mismatch) < 1e-3
    torch.testing.assert_close(norms.cpu(), cpu_norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", (2, 4))
def test_quantization_is_per_vector(bits, gen, seed):
    """Codes of a vector do not depend on the other vectors encoded with it (no batch statistics):
    encoding a tensor whole or one row at a time gives the same codes and norms, except for
    coordinates within float32 rounding of a boundary (the batched rotation GEMM rounds differently)."""
    q = TurboQuantMSE(64, bits, seed=seed % 997)
    x = torch.randn(97, 64, generator=gen) * torch.logspace(-3, 3, 97).unsqueeze(-1)
    codes, norms = q.encode(x)
    rows = [q.encode(row) for row in x]
    torch.testing.assert_close(torch.stack([n for _, n in rows]), norms, rtol=1e-6, atol=0)
    whole = unpack_codes(codes, bits, 64)
    single = unpack_codes(torch.stack([c for c, _ in rows]), bits, 64)
    assert (whole != single).sum().item() <= 2
    assert (whole.long() - single.long()).abs().max().item() <= 1
