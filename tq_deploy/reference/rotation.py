"""The fixed random rotation Pi applied before scalar quantization.

TurboQuant multiplies each (normalized) vector by a random orthogonal matrix so
that every coordinate follows the same known distribution whatever the input
(paper, Sec. 3.1). Two families:

* Haar: Pi uniform on O(d), from the QR factorization of a Gaussian matrix with
  the signs of R's diagonal moved into Q (without that correction QR is not
  Haar-distributed).
* Randomized Hadamard: Pi = prod_r (H_d / sqrt(d)) diag(s_r), s_r random signs,
  applied in O(d log d) by the fast Walsh-Hadamard transform; d a power of two.

Both are drawn on the CPU in float64 from a seeded generator and then cast, so
the same seed gives the same matrix on every machine and device. Backends get
the dense float32 matrix (y = Pi x, i.e. ``y = x @ Pi.T``).
"""

from __future__ import annotations

import torch

from tq_deploy.reference.checks import check_head_dim, check_seed

ROTATION_KINDS = ("haar", "hadamard")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(check_seed("seed", seed))


def haar_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal [dim, dim] float32 matrix, reproducible from ``seed``."""
    check_head_dim("dim", dim, minimum=1)
    gaussian = torch.randn(dim, dim, dtype=torch.float64, generator=_generator(seed))
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(torch.float32)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dimension (a power of two)."""
    dim = x.shape[-1]
    if dim & (dim - 1):
        raise ValueError(f"x.shape[-1]={dim}, expected a power of two for the Hadamard transform")
    lead = x.shape[:-1]
    y = x.reshape(-1, dim)
    h = 1
    while h < dim:
        # Butterfly over pairs (i, i + h) inside blocks of 2h.
        y = y.reshape(-1, dim // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, dim)) / dim**0.5


def hadamard_signs(dim: int, seed: int = 0, rounds: int = 2) -> torch.Tensor:
    """The random sign vectors s_1..s_rounds, float64 [rounds, dim]."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}, expected >= 1")
    bits = torch.randint(0, 2, (rounds, dim), generator=_generator(seed), dtype=torch.int64)
    return bits.to(torch.float64) * 2 - 1


def randomized_hadamard(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """y = prod_r (H / sqrt(d)) diag(s_r) x over the last dimension, in O(d log d)."""
    for s in signs:
        x = fwht(x * s.to(x.dtype))
    return x


def hadamard_rotation(dim: int, seed: int = 0, rounds: int = 2) -> torch.Tensor:
    """The randomized Hadamard rotation materialized as a dense float32 [dim, dim] Pi."""
    check_head_dim("dim", dim, minimum=1)
    if dim & (dim - 1):
        raise ValueError(f"dim={dim}, expected a power of two for the Hadamard rotation")
    identity = torch.eye(dim, dtype=torch.float64)
    # Row j of the transformed identity is Pi e_j, so the rows form Pi^T.
    return randomized_hadamard(identity, hadamard_signs(dim, seed, rounds)).T.contiguous().to(torch.float32)


def make_rotation(dim: int, kind: str = "haar", seed: int = 0, rounds: int = 2) -> torch.Tensor:
    """Pi of the given kind; see the module docstring."""
    if kind == "haar":
        return haar_rotation(dim, seed)
    if kind == "hadamard":
        return hadamard_rotation(dim, seed, rounds)
    raise ValueError(f"rotation kind={kind!r}, expected one of {ROTATION_KINDS}")
