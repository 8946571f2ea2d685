"""TurboQuant quantizers (paper, Algorithms 1 and 2).

TurboQuant_mse, for a vector x in R^D:

    1. normalize   ||x||, u = x / ||x||
    2. rotate      y = Pi u          (every y_j then follows f_D, see codebook.py)
    3. quantize    idx_j = argmin_k |y_j - c_k|  (= number of boundaries below y_j)
    4. pack        b bits per code (packing.py)
    decode:        x_hat = ||x|| Pi^T c[idx]

TurboQuant_prod adds an unbiased inner-product estimate: a (b-1)-bit MSE stage,
then one QJL bit per coordinate of the residual r = x - x_hat_mse:

    s = sign(S r),  S in R^{D x D} with i.i.d. N(0, 1) entries
    x_hat = x_hat_mse + sqrt(pi/2) / D * ||r|| S^T s,   E[<q, x_hat>] = <q, x>.

The functional ``encode_reference``/``decode_reference`` take the rotation and
codebook as tensors, exactly like the ONNX ops. The fast backends and the
dispatcher that picks one live above this package (:mod:`tq_deploy.dispatch`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from tq_deploy.ops import packed_size
from tq_deploy.reference.checks import (
    FLOAT_DTYPES,
    DecodeArgs,
    EncodeArgs,
    check_bits,
    check_decode,
    check_encode,
    check_head_dim,
    check_seed,
    check_tensor,
)
from tq_deploy.reference.codebook import codebook_boundaries, expected_mse, lloyd_max_codebook, paper_bounds
from tq_deploy.reference.packing import pack_codes, unpack_codes
from tq_deploy.reference.rotation import make_rotation


def vector_norms(xf: torch.Tensor) -> torch.Tensor:
    """||x||_2 of every row of float32 ``xf``, computed on x * 2^-e with 2^e the binade of max |x|:
    the power-of-two scaling is exact, so the result is the plain float32 norm wherever that
    neither overflows nor underflows, and finite and accurate where it would (1e20s, 1e-30s)."""
    _, exponent = torch.frexp(xf.abs().amax(-1, keepdim=True))
    scaled = torch.ldexp(xf, -exponent)
    return torch.ldexp(torch.linalg.vector_norm(scaled, dim=-1, keepdim=True), exponent).squeeze(-1)


def normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: float32 norms and unit vectors (zero vectors stay zero)."""
    xf = x.float()
    norms = vector_norms(xf)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return xf / safe.unsqueeze(-1), norms


def saturate(x_hat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x_hat`` in ``dtype``, values past its largest finite number set to that number.

    quantize() computes in float32 and returns x's dtype: a finite fp16 input has coordinates
    <= 65504, but its reconstruction may overshoot by the quantization error, and a plain cast would
    turn that into inf. The largest finite value is the nearest one to such a coordinate."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(x_hat.dtype).max:
        limit = torch.finfo(dtype).max
        x_hat = x_hat.clamp(-limit, limit)
    return x_hat.to(dtype)


def rotate(u: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Step 2: y = Pi u for every vector (row) of u."""
    return u @ rotation.T


def quantize_coordinates(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Step 3: nearest centroid index per coordinate; a tie goes to the lower code."""
    # bucketize(right=False) counts the boundaries strictly below y.
    return torch.bucketize(y, codebook_boundaries(codebook).to(y.device)).to(torch.uint8)


def encode_reference(x, rotation, codebook, bits):
    """x[..., D] -> (packed codes uint8 [..., ceil(D*bits/8)], norms float32 [...])."""
    return encode_checked(check_encode(x, rotation, codebook, bits))


def encode_checked(a: EncodeArgs):
    u, norms = normalize(a.x)
    idx = quantize_coordinates(rotate(u, a.rotation.to(u.device)), a.codebook.to(u.device))
    return pack_codes(idx, a.bits), norms


def decode_reference(codes, norms, rotation, codebook, bits, dtype=torch.float32):
    """(codes, norms) -> x_hat[..., D] = norm * Pi^T c[idx], in ``dtype``."""
    return decode_checked(check_decode(codes, norms, rotation, codebook, bits, dtype))


def decode_checked(a: DecodeArgs):
    device = a.codes.device
    centroids = a.codebook.to(device)[unpack_codes(a.codes, a.bits, a.head_dim).long()]
    return ((centroids @ a.rotation.to(device)) * a.norms.unsqueeze(-1)).to(a.dtype)


def random_unit_vectors(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Uniform points on the unit sphere S^{dim-1} (normalized Gaussians), float32."""
    g = torch.Generator().manual_seed(check_seed("seed", seed))
    x = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)).float()


class TurboQuantMSE:
    """TurboQuant_mse for vectors of ``head_dim`` coordinates at ``bits`` bits each.

    The rotation and codebook are fixed by (head_dim, bits, seed, rotation,
    distribution): no calibration data is involved.
    """

    def __init__(self, head_dim: int, bits: int, seed: int = 0, rotation: str = "haar",
                 distribution: str = "sphere", device: torch.device | str | None = None,
                 norm_dtype: torch.dtype = torch.float32):
        self.head_dim = check_head_dim("head_dim", head_dim)
        if norm_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"norm_dtype={norm_dtype}, expected torch.float32 or torch.float16")
        self.norm_dtype = norm_dtype  # the stored norm (a paged cache's TN); codes use the float32 norm
        self.bits = check_bits("bits", bits)
        self.seed = seed
        self.rotation_kind = rotation
        self.distribution = distribution
        self.rotation = make_rotation(head_dim, rotation, seed).to(device)
        self.codebook = lloyd_max_codebook(head_dim, bits, distribution).to(device)
        self.boundaries = codebook_boundaries(self.codebook)
        self.packed_size = packed_size(head_dim, bits)

    def to(self, device) -> "TurboQuantMSE":
        self.rotation = self.rotation.to(device)
        self.codebook = self.codebook.to(device)
        self.boundaries = self.boundaries.to(device)
        return self

    def _check_dim(self, x: torch.Tensor) -> None:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x.shape[-1]={x.shape[-1]}, expected head_dim={self.head_dim}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_dim(x)
        return encode_reference(x, self.rotation.to(x.device), self.codebook.to(x.device), self.bits)

    def decode(self, codes: torch.Tensor, norms: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return decode_reference(codes, norms, self.rotation.to(codes.device), self.codebook.to(codes.device),
                                self.bits, dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Encode then decode; returns x_hat in x's dtype.

        Packing is lossless, so the round trip skips it: the same codes, the
        same centroids, without the bit shuffling (this is the hot path of the
        perplexity evaluation).
        """
        self._check_dim(x)
        u, norms = normalize(x)
        idx = quantize_coordinates(rotate(u, self.rotation.to(x.device)), self.codebook.to(x.device))
        stored = norms.to(self.norm_dtype).float()
        x_hat = (self.codebook.to(x.device)[idx.long()] @ self.rotation.to(x.device)) * stored.unsqueeze(-1)
        return saturate(x_hat, x.dtype)

    def validate(self, num_vectors: int = 20000, seed: int = 1) -> dict:
        """Measured per-vector MSE on random unit vectors against theory and the paper's bounds."""
        x = random_unit_vectors(num_vectors, self.head_dim, seed).to(self.rotation.device)
        codes, norms = self.encode(x)  # the deployed path, packing included
        err = (self.decode(codes, norms) - x).pow(2).sum(-1)
        lower, upper = paper_bounds(self.bits)
        mse = float(err.mean())
        return {
            "bits": self.bits,
            "head_dim": self.head_dim,
            "mse": mse,
            "mse_stderr": float(err.std() / math.sqrt(num_vectors)),
            "theory": expected_mse(self.head_dim, self.bits, self.distribution),
            "lower_bound": lower,
            "upper_bound": upper,
            "within_bounds": lower <= mse <= upper,
        }

    def bytes_per_vector(self) -> int:
        """Packed codes plus one float32 norm."""
        return self.packed_size + 4

    def compression_ratio(self, source_bits: int = 16) -> float:
        """Size of a ``source_bits`` vector over its TurboQuant size (codes + float32 norm)."""
        return self.head_dim * source_bits / 8 / self.bytes_per_vector()

    def memory_report(self, seq_len: int, num_layers: int, num_kv_heads: int, source_bits: int = 16) -> dict:
        """KV-cache bytes (keys and values) for one sequence, uncompressed vs TurboQuant."""
        for name, value in (("seq_len", seq_len), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("source_bits", source_bits)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name}={value!r}, expected an int >= 1")
        vectors = 2 * seq_len * num_layers * num_kv_heads
        original = vectors * self.head_dim * source_bits // 8
        compressed = vectors * self.bytes_per_vector()
        return {
            "seq_len": seq_len,
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_dim": self.head_dim,
            "bits": self.bits,
            "original_bytes": original,
            "compressed_bytes": compressed,
            "ratio": original / compressed,
        }


@dataclass
class ProdCodes:
    """TurboQuant_prod encoding: MSE stage plus the packed QJL signs of the residual."""

    mse_codes: torch.Tensor | None  # None when the MSE stage has 0 bits
    norms: torch.Tensor
    qjl_signs: torch.Tensor  # packed 1-bit, 1 means +1
    residual_norms: torch.Tensor


class TurboQuantProd:
    """TurboQuant_prod: (bits-1)-bit TurboQuant_mse plus a 1-bit QJL of the residual."""

    def __init__(self, head_dim: int, bits: int, seed: int = 0, rotation: str = "haar",
                 distribution: str = "sphere", device=None):
        self.head_dim = check_head_dim("head_dim", head_dim)
        self.bits = check_bits("bits", bits)
        self.mse = TurboQuantMSE(head_dim, bits - 1, seed, rotation, distribution, device) if bits > 1 else None
        g = torch.Generator().manual_seed(check_seed("seed", seed) + 0x51D)
        self.projection = torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64).float().to(device)

    def encode(self, x: torch.Tensor) -> ProdCodes:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x.shape[-1]={x.shape[-1]}, expected head_dim={self.head_dim}")
        xf = x.float()
        if self.mse is not None:
            mse_codes, norms = self.mse.encode(xf)
            residual = xf - self.mse.decode(mse_codes, norms)
        else:
            mse_codes, norms = None, torch.linalg.vector_norm(xf, dim=-1)
            residual = xf
        projected = residual @ self.projection.to(x.device).T
        signs = pack_codes((projected >= 0).to(torch.uint8), 1)
        return ProdCodes(mse_codes, norms, signs, torch.linalg.vector_norm(residual, dim=-1))

    def decode(self, codes: ProdCodes, dtype=torch.float32) -> torch.Tensor:
        signs = unpack_codes(codes.qjl_signs, 1, self.head_dim).float() * 2 - 1
        scale = math.sqrt(math.pi / 2) / self.head_dim
        x_hat = scale * codes.residual_norms.unsqueeze(-1) * (signs @ self.projection.to(signs.device))
        if self.mse is not None:
            x_hat = x_hat + self.mse.decode(codes.mse_codes, codes.norms)
        return x_hat.to(dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return saturate(self.decode(self.encode(x), torch.float32), x.dtype)

    def inner_product(self, query: torch.Tensor, codes: ProdCodes) -> torch.Tensor:
        """Unbiased estimate of <query, x> for every encoded x (broadcast over leading dims)."""
        return (query.float() * self.decode(codes)).sum(-1)


class MixedPrecisionTurboQuant:
    """Outlier channels at ``outlier_bits``, the rest at ``regular_bits`` (paper, Sec. 4.3).

    The channels are split into two groups, each quantized by its own
    TurboQuant_mse instance over its own sub-dimension. ``outlier_idx`` fixes the
    outlier channels; without it they are chosen per call as the channels of
    largest mean |x| over all leading dimensions (no calibration set).
    Effective bits per coordinate: (n_out * b_out + (D - n_out) * b_reg) / D.
    """

    def __init__(self, head_dim: int, outlier_channels: int, outlier_bits: int, regular_bits: int,
                 seed: int = 0, rotation: str = "haar", outlier_idx: torch.Tensor | None = None, device=None):
        self.head_dim = check_head_dim("head_dim", head_dim)
        if not 2 <= outlier_channels <= head_dim - 2:
            raise ValueError(f"outlier_channels={outlier_channels}, expected 2..{head_dim - 2}")
        self.outlier_channels = outlier_channels
        self.outlier = TurboQuantMSE(outlier_channels, outlier_bits, seed, rotation, device=device)
        self.regular = TurboQuantMSE(head_dim - outlier_channels, regular_bits, seed + 1, rotation, device=device)
        self.outlier_idx = None if outlier_idx is None else self._check_outlier_idx(outlier_idx)

    def _check_outlier_idx(self, outlier_idx) -> torch.Tensor:
        idx = torch.as_tensor(outlier_idx)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            # .long() would truncate 1.7 to channel 1
            raise ValueError(f"outlier_idx has dtype {idx.dtype}, expected integer channel indices")
        idx = idx.flatten().long()
        expected = f"{self.outlier_channels} distinct channels in 0..{self.head_dim - 1}"
        if idx.numel() != self.outlier_channels or idx.unique().numel() != idx.numel() \
                or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.head_dim)):
            raise ValueError(f"outlier_idx={idx.tolist()}, expected {expected}")
        return idx

    @classmethod
    def preset(cls, head_dim: int, effective_bits: float, seed: int = 0, rotation: str = "haar", device=None):
        """2.5 bits = half the channels at 3 bits, half at 2; 3.5 bits = 4 and 3."""
        low = int(math.floor(effective_bits))
        if effective_bits - low != 0.5 or low not in (1, 2, 3):
            raise ValueError(f"effective_bits={effective_bits}, expected one of 1.5, 2.5, 3.5")
        return cls(head_dim, head_dim // 2, low + 1, low, seed, rotation, device=device)

    @property
    def effective_bits(self) -> float:
        n = self.outlier_channels
        return (n * self.outlier.bits + (self.head_dim - n) * self.regular.bits) / self.head_dim

    def split_channels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.outlier_idx is not None:
            outlier = self.outlier_idx.to(x.device)
        else:
            magnitude = x.float().abs().reshape(-1, self.head_dim).mean(0)
            outlier = torch.topk(magnitude, self.outlier_channels).indices
        mask = torch.ones(self.head_dim, dtype=torch.bool, device=x.device)
        mask[outlier] = False
        return outlier.sort().values, torch.nonzero(mask).flatten()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x.shape[-1]={x.shape[-1]}, expected head_dim={self.head_dim}")
        outlier, regular = self.split_channels(x)
        out = torch.empty_like(x)
        out[..., outlier] = self.outlier.quantize(x[..., outlier])
        out[..., regular] = self.regular.quantize(x[..., regular])
        return out
