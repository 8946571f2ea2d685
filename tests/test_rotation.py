"""Random rotations Pi: Haar via QR and the randomized Hadamard transform (issue item 4)."""

from __future__ import annotations

import math

import pytest
import torch

from tq_deploy.reference.rotation import (
    fwht,
    haar_rotation,
    hadamard_rotation,
    hadamard_signs,
    make_rotation,
    randomized_hadamard,
)


def sylvester_hadamard(dim: int) -> torch.Tensor:
    """H_1 = [1], H_2n = [[H, H], [H, -H]] (unnormalized, symmetric), built independently."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def assert_orthogonal(pi: torch.Tensor, atol: float = 2e-6) -> None:
    d = pi.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    p = pi.double()
    torch.testing.assert_close(p @ p.T, eye, rtol=0, atol=atol)
    torch.testing.assert_close(p.T @ p, eye, rtol=0, atol=atol)


@pytest.mark.parametrize("dim", [1, 2, 5, 63, 64, 100, 128, 256])
def test_haar_orthogonal_float32_cpu(dim, seed):
    pi = haar_rotation(dim, seed)
    assert pi.dtype == torch.float32 and pi.shape == (dim, dim) and pi.device.type == "cpu"
    assert_orthogonal(pi)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_reproducible_from_seed(kind, seed):
    a = make_rotation(128, kind, seed)
    b = make_rotation(128, kind, seed)
    assert torch.equal(a, b)
    c = make_rotation(128, kind, seed + 1)
    assert not torch.allclose(a, c)


def test_haar_is_haar_distributed(single_thread):
    """Across seeds, Pi e_1 is uniform on the sphere: mean 0, each coordinate variance 1/d,
    and E[tr Pi] = 0, E[(tr Pi)^2] = 1 for Haar on O(d). QR without the sign fix of R's
    diagonal fails the mean test (LAPACK makes Q[0, 0] always negative)."""
    d, n = 16, 2000
    pis = torch.stack([haar_rotation(d, s).double() for s in range(n)])  # [n, d, d]
    first_col = pis[:, :, 0]  # Pi e_1
    sigma = math.sqrt(1 / d / n)
    assert float(first_col.mean(0).abs().max()) < 5 * sigma
    # Var of y_j is 1/d; the sample variance has relative stderr ~ sqrt(2/n) (a bit less on the sphere).
    var = first_col.pow(2).mean(0)
    assert float((var * d - 1).abs().max()) < 5 * math.sqrt(2 / n)
    diag = torch.diagonal(pis, dim1=1, dim2=2)
    assert float(diag.mean(0).abs().max()) < 5 * sigma
    trace = diag.sum(-1)
    assert abs(float(trace.mean())) < 5 / math.sqrt(n)
    assert abs(float(trace.pow(2).mean()) - 1) < 0.25


def test_haar_determinant_takes_both_signs(single_thread):
    """O(d), not SO(d): about half the draws have determinant -1."""
    dets = torch.stack([torch.linalg.det(haar_rotation(8, s).double()) for s in range(400)])
    torch.testing.assert_close(dets.abs(), torch.ones_like(dets), rtol=0, atol=1e-5)
    negative = int((dets < 0).sum())
    assert 140 < negative < 260  # Binomial(400, 1/2): mean 200, sd 10


@pytest.mark.parametrize("dim", [1, 2, 4, 8, 64, 256])
def test_fwht_matches_sylvester_matrix(dim, gen):
    h = sylvester_hadamard(dim) / math.sqrt(dim)
    torch.testing.assert_close(fwht(torch.eye(dim, dtype=torch.float64)), h, rtol=0, atol=1e-12)
    x = torch.randn(3, 5, dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=0, atol=1e-10)  # H/sqrt(d) is its own inverse


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_randomized_hadamard_dense_equals_fast_and_the_formula(dim, rounds, seed, gen):
    pi = hadamard_rotation(dim, seed, rounds)
    assert pi.dtype == torch.float32 and pi.shape == (dim, dim)
    assert_orthogonal(pi)
    signs = hadamard_signs(dim, seed, rounds)
    assert signs.shape == (rounds, dim) and set(signs.unique().tolist()) <= {-1.0, 1.0}
    # Independent dense formula: Pi = (H/sqrt d) diag(s_R) ... (H/sqrt d) diag(s_1).
    h = sylvester_hadamard(dim) / math.sqrt(dim)
    expected = torch.eye(dim, dtype=torch.float64)
    for s in signs:
        expected = h @ torch.diag(s) @ expected
    torch.testing.assert_close(pi.double(), expected, rtol=0, atol=1e-6)
    # The O(d log d) path applies the same Pi: y = Pi x  <=>  y = x @ Pi.T.
    x = torch.randn(7, dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(randomized_hadamard(x, signs), x @ pi.double().T, rtol=0, atol=1e-5)


def test_hadamard_rounds_are_configurable():
    one, two, three = (hadamard_rotation(64, 5, r) for r in (1, 2, 3))
    assert not torch.allclose(one, two) and not torch.allclose(two, three)
    assert torch.equal(make_rotation(64, "hadamard", 5, rounds=3), three)
    with pytest.raises(ValueError, match=r"rounds=0.*>= 1"):
        hadamard_rotation(64, 5, 0)


@pytest.mark.parametrize("dim", [3, 12, 100, 96])
def test_hadamard_rejects_non_power_of_two(dim):
    with pytest.raises(ValueError, match=rf"dim={dim}.*power of two"):
        hadamard_rotation(dim)
    with pytest.raises(ValueError, match=rf"x.shape\[-1\]={dim}.*power of two"):
        fwht(torch.zeros(2, dim))
    # Haar works for any dimension.
    assert_orthogonal(make_rotation(dim, "haar"))


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match=r"kind='givens'.*haar.*hadamard"):
        make_rotation(64, "givens")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_same_matrix_on_cuda(kind):
    """Drawn on the CPU in float64 and cast: the CUDA copy is bit-identical, on any machine."""
    from tq_deploy.reference.quantizer import TurboQuantMSE

    cpu = make_rotation(128, kind, 11)
    q = TurboQuantMSE(128, 3, seed=11, rotation=kind, device="cuda")
    assert q.rotation.is_cuda
    assert torch.equal(q.rotation.cpu(), cpu)
    assert torch.equal(make_rotation(128, kind, 11).cuda().cpu(), cpu)
