"""Host-side helpers shared by the Triton kernels: argument checks and cached constants.

Nothing here launches a kernel. The rotation is split into parts in the input's
half precision so that tensor cores reproduce an fp32 product (see
:func:`rotation_parts`); the parts are cached per rotation tensor.
"""

from __future__ import annotations

import weakref

import torch

from tq_deploy.ops import SUPPORTED_BITS, packed_size  # noqa: F401  (re-exported for the kernels' hosts)
from tq_deploy.reference.checks import FLOAT_DTYPES, check_bits  # noqa: F401

SUPPORTED_DIMS = (32, 64, 128, 256)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Scale between consecutive rotation parts: a part holds the residual of the
# previous ones times this power of two, so every part is a normal number.
PART_SCALE = {torch.float16: 2048.0, torch.bfloat16: 256.0}
PART_COUNT = {torch.float16: 2, torch.bfloat16: 3}

_cache: dict = {}
_CACHE_LIMIT = 64


def check_dim(name: str, dim: int) -> int:
    if dim not in SUPPORTED_DIMS:
        raise ValueError(f"{name}: head dimension {dim}, expected one of {SUPPORTED_DIMS} for the Triton kernels")
    return dim


def check_rotation(rotation: torch.Tensor, dim: int) -> None:
    if rotation.shape != (dim, dim):
        raise ValueError(f"rotation: shape {tuple(rotation.shape)}, expected ({dim}, {dim})")


def check_codebook(name: str, codebook: torch.Tensor, bits: int) -> None:
    if codebook.shape != (2**bits,):
        raise ValueError(f"{name}: shape {tuple(codebook.shape)}, expected ({2**bits},) for bits={bits}")


def check_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name}: dtype {t.dtype}, expected one of {tuple(allowed)}")


def _key(kind: str, t: torch.Tensor, *extra):
    return (kind, id(t), *extra)


def _lookup(key, t: torch.Tensor):
    """Cached value for tensor ``t`` if it is the same live object at the same version."""
    entry = _cache.get(key)
    if entry is not None and entry[0]() is t and entry[1] == t._version:
        return entry[2]
    return None


def _remember(key, t: torch.Tensor, value):
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = (weakref.ref(t), t._version, value)
    return value


def rotation_parts(rotation: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Pi^T split as sum_k part_k * PART_SCALE**-k with every part in ``dtype``.

    x is exact in its own half type, products of two halves are exact in fp32
    and the tensor cores accumulate in fp32, so x @ sum(parts) reproduces the
    fp32 product x @ Pi^T to about 2**-22 relative (fp16: 2 parts of 11 bits;
    bf16: 3 parts of 8 bits). For fp32 inputs the single fp32 Pi^T is returned.
    """
    key = _key("rot_parts", rotation, dtype, str(device))
    hit = _lookup(key, rotation)
    if hit is not None:
        return hit
    rot_t = rotation.detach().to(device=device, dtype=torch.float32).t().contiguous()
    if dtype == torch.float32:
        return _remember(key, rotation, (rot_t,))
    scale = PART_SCALE[dtype]
    parts = []
    residual = rot_t
    for k in range(PART_COUNT[dtype]):
        part = residual.to(dtype)
        parts.append(part.contiguous())
        residual = (residual - part.float()) * scale
    return _remember(key, rotation, tuple(parts))


def float_matrix(rotation: torch.Tensor, device, transpose: bool) -> torch.Tensor:
    """Contiguous fp32 copy of Pi (or Pi^T) on ``device``, cached."""
    key = _key("rot_f32", rotation, transpose, str(device))
    hit = _lookup(key, rotation)
    if hit is not None:
        return hit
    m = rotation.detach().to(device=device, dtype=torch.float32)
    return _remember(key, rotation, (m.t() if transpose else m).contiguous())


def boundaries(codebook: torch.Tensor, device) -> torch.Tensor:
    """Midpoints between consecutive centroids, fp32, computed like the reference."""
    key = _key("bounds", codebook, str(device))
    hit = _lookup(key, codebook)
    if hit is not None:
        return hit
    c = codebook.detach().to(device=device, dtype=torch.float32)
    return _remember(key, codebook, ((c[:-1] + c[1:]) / 2).contiguous())


def codebook_as(codebook: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    key = _key("cb", codebook, dtype, str(device))
    hit = _lookup(key, codebook)
    if hit is not None:
        return hit
    return _remember(key, codebook, codebook.detach().to(device=device, dtype=torch.float32).to(dtype).contiguous())


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """int32 view of packed uint8 codes (last dimension a multiple of 4 bytes)."""
    return codes.view(torch.int32)


def pair_table(codebook: torch.Tensor, device) -> torch.Tensor:
    """int32 [256] for 4-bit codes: entry b = fp16(c[b & 15]) | fp16(c[b >> 4]) << 16 (bit patterns)."""
    key = _key("pairs", codebook, str(device))
    hit = _lookup(key, codebook)
    if hit is not None:
        return hit
    half = codebook.detach().to(device=device, dtype=torch.float32).to(torch.float16)
    bits = half.view(torch.int16).to(torch.int32) & 0xFFFF
    b = torch.arange(256, device=device)
    table = bits[b & 15] | (bits[b >> 4] << 16)
    return _remember(key, codebook, table.to(torch.int32).contiguous())
