"""Lloyd-Max codebooks for the coordinates of a random unit vector.

After a uniformly random rotation, each coordinate of a unit vector in R^d has
the density (paper, Lemma 1)

    f_d(x) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - x^2)^((d-3)/2),  x in [-1, 1],

which tends to N(0, 1/d) as d grows. TurboQuant quantizes each coordinate with
the optimal (Lloyd-Max) scalar quantizer for f_d: centroids c_1 < ... < c_K,
K = 2^b, with decision boundaries at the midpoints of neighbouring centroids
and each centroid the conditional mean of its cell:

    c_j = E[x | t_{j-1} < x <= t_j],   t_j = (c_j + c_{j+1}) / 2.

The per-vector MSE of a unit vector is d times the per-coordinate distortion;
the paper bounds it by 4^-b <= D_mse <= (sqrt(3) pi / 2) 4^-b.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from tq_deploy.reference.checks import check_bits, check_head_dim

DISTRIBUTIONS = ("sphere", "gaussian")
_GRID_POINTS = 1 << 18
_MAX_ITERATIONS = 20000
_TOLERANCE = 1e-12


class _SphereCoordinate:
    """Cell mass and first moment of f_d, integrated in theta = arccos(x).

    With x = cos(theta) the density becomes proportional to sin(theta)^(d-2) on
    [0, pi], which is smooth for every d >= 2 (the arcsine law at d = 2 has no
    endpoint singularity there), so a cumulative trapezoid rule is accurate.
    """

    def __init__(self, dim: int):
        theta = np.linspace(0.0, math.pi, _GRID_POINTS)
        with np.errstate(divide="ignore"):
            log_w = (dim - 2) * np.log(np.sin(theta)) if dim > 2 else np.zeros_like(theta)
        w = np.exp(log_w - log_w[np.isfinite(log_w)].max())
        x = np.cos(theta)
        # Integrate from x = -1 upwards: reverse theta so x ascends.
        self.x = x[::-1].copy()
        w = w[::-1]
        dtheta = math.pi / (_GRID_POINTS - 1)
        mass = np.concatenate([[0.0], np.cumsum((w[1:] + w[:-1]) * 0.5 * dtheta)])
        xw = self.x * w
        moment1 = np.concatenate([[0.0], np.cumsum((xw[1:] + xw[:-1]) * 0.5 * dtheta)])
        x2w = self.x * xw
        moment2 = np.concatenate([[0.0], np.cumsum((x2w[1:] + x2w[:-1]) * 0.5 * dtheta)])
        total = mass[-1]
        self.mass, self.moment1, self.second_moment = mass / total, moment1 / total, moment2[-1] / total
        # f^(1/3) in x is (1 - x^2)^((dim-3)/6); in theta that is sin^((dim-3)/3 + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_c = ((dim - 3) / 3 + 1) * np.log(np.sin(theta))
        c = np.exp(np.where(np.isfinite(log_c), log_c - log_c[np.isfinite(log_c)].max(), -np.inf))[::-1]
        companded = np.concatenate([[0.0], np.cumsum((c[1:] + c[:-1]) * 0.5 * dtheta)])
        self.companded_mass = companded / companded[-1]

    def cumulative(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.clip(t, -1.0, 1.0)
        return np.interp(t, self.x, self.mass), np.interp(t, self.x, self.moment1)

    def quantile(self, p: np.ndarray) -> np.ndarray:
        return np.interp(p, self.mass, self.x)

    def companded_quantile(self, p: np.ndarray) -> np.ndarray:
        """Quantiles of the density proportional to f^(1/3): the asymptotically optimal placement
        of many cells (Panter-Dite), a starting point from which Lloyd's iteration converges fast."""
        return np.interp(p, self.companded_mass, self.x)


class _Gaussian:
    """N(0, 1/d): mass from erf, first moment in closed form, sigma^2 (phi(a) - phi(b))."""

    def __init__(self, dim: int):
        self.sigma = 1.0 / math.sqrt(dim)
        self.second_moment = self.sigma**2

    def cumulative(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(t, dtype=np.float64) / self.sigma
        erf = np.vectorize(math.erf)
        mass = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * self.sigma)
        return mass, -(self.sigma**2) * pdf

    def quantile(self, p: np.ndarray, sigma: float | None = None) -> np.ndarray:
        # Bisection on the CDF is plenty for an initial guess.
        sigma = sigma or self.sigma
        lo, hi = np.full_like(p, -10 * sigma), np.full_like(p, 10 * sigma)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            z = mid / sigma
            below = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0))) < p
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def companded_quantile(self, p: np.ndarray) -> np.ndarray:
        """Quantiles of f^(1/3), for a Gaussian N(0, 3 sigma^2) (see _SphereCoordinate)."""
        return self.quantile(p, math.sqrt(3.0) * self.sigma)


def _distribution(dim: int, distribution: str):
    if distribution == "sphere":
        return _SphereCoordinate(dim)
    if distribution == "gaussian":
        return _Gaussian(dim)
    raise ValueError(f"distribution={distribution!r}, expected one of {DISTRIBUTIONS}")


def _cell_statistics(dist, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mass and first moment of each cell between midpoint boundaries."""
    edges = np.concatenate([[-np.inf], (centroids[1:] + centroids[:-1]) / 2, [np.inf]])
    mass, moment1 = dist.cumulative(np.where(np.isinf(edges), np.sign(edges) * 1e3, edges))
    return np.diff(mass), np.diff(moment1)


@lru_cache(maxsize=None)
def _lloyd_max(dim: int, bits: int, distribution: str) -> tuple[tuple[float, ...], float]:
    dist = _distribution(dim, distribution)
    levels = 2**bits
    centroids = dist.companded_quantile((np.arange(levels) + 0.5) / levels)
    for _ in range(_MAX_ITERATIONS):
        mass, moment1 = _cell_statistics(dist, centroids)
        updated = moment1 / np.maximum(mass, 1e-300)
        updated = 0.5 * (updated - updated[::-1])  # the density is even: keep the codebook symmetric
        if np.max(np.abs(updated - centroids)) < _TOLERANCE:
            centroids = updated
            break
        centroids = updated
    mass, moment1 = _cell_statistics(dist, centroids)
    # E[(x - c(x))^2] = E[x^2] - sum_j c_j^2 P_j when each c_j is its cell's mean.
    distortion = float(dist.second_moment - np.sum(centroids**2 * mass))
    return tuple(float(c) for c in centroids), distortion


def lloyd_max_codebook(dim: int, bits: int, distribution: str = "sphere") -> torch.Tensor:
    """Ascending float32 centroids (2**bits) of the Lloyd-Max quantizer for f_dim."""
    check_head_dim("dim", dim)
    check_bits("bits", bits)
    centroids, _ = _lloyd_max(dim, bits, distribution)
    return torch.tensor(centroids, dtype=torch.float32)


def codebook_boundaries(codebook: torch.Tensor) -> torch.Tensor:
    """Decision boundaries t_j = (c_j + c_{j+1}) / 2, ascending, 2**bits - 1 of them."""
    return (codebook[1:] + codebook[:-1]) * 0.5


def expected_mse(dim: int, bits: int, distribution: str = "sphere") -> float:
    """Theoretical per-vector MSE of a unit vector: dim x per-coordinate distortion under f_dim."""
    check_head_dim("dim", dim)
    check_bits("bits", bits)
    _, distortion = _lloyd_max(dim, bits, distribution)
    if distribution == "gaussian":
        # The Gaussian codebook applied to the sphere's coordinates: evaluate under f_dim.
        distortion = _distortion_under(dim, _lloyd_max(dim, bits, "gaussian")[0])
    return dim * distortion


def _distortion_under(dim: int, centroids: tuple[float, ...]) -> float:
    dist = _SphereCoordinate(dim)
    c = np.asarray(centroids)
    mass, moment1 = _cell_statistics(dist, c)
    return float(dist.second_moment - 2 * np.sum(c * moment1) + np.sum(c**2 * mass))


def paper_bounds(bits: int) -> tuple[float, float]:
    """The paper's per-vector MSE bounds for unit vectors: (4^-b, sqrt(3) pi / 2 * 4^-b)."""
    check_bits("bits", bits)
    lower = 4.0**-bits
    return lower, math.sqrt(3.0) * math.pi / 2.0 * lower
