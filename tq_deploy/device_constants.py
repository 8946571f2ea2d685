"""Device copies of an op's constant inputs (rotation, codebooks), made once and reused.

Every decode step passes the same rotation and codebook tensors. The GPU
backends need them contiguous, in a given dtype and on the kernel's device;
converting on every call would cost a copy and a launch per layer. The cache
keys on the source tensor's identity and version (``Tensor._version`` moves on
every in-place write), so an edited or replaced tensor is converted again.
"""

from __future__ import annotations

import weakref

import torch

_cache: dict = {}
_CACHE_LIMIT = 128


def cached(kind: str, source: torch.Tensor, make, *extra):
    """``make()`` for (kind, source, *extra), remembered while ``source`` lives unchanged."""
    key = (kind, id(source), *extra)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is source and entry[1] == source._version:
        return entry[2]
    value = make()
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = (weakref.ref(source), source._version, value)
    return value


def float_matrix(rotation: torch.Tensor, device, transpose: bool = False) -> torch.Tensor:
    """Contiguous fp32 Pi (or Pi^T) on ``device``."""
    def make():
        m = rotation.detach().to(device=device, dtype=torch.float32)
        return (m.t() if transpose else m).contiguous()

    return cached("rot_f32", rotation, make, transpose, str(device))


def codebook_as(codebook: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """Contiguous centroids in ``dtype`` (rounded from fp32) on ``device``."""
    return cached("cb", codebook, lambda: codebook.detach().to(device=device, dtype=torch.float32).to(dtype)
                  .contiguous(), dtype, str(device))


def boundaries(codebook: torch.Tensor, device) -> torch.Tensor:
    """Midpoints between consecutive centroids, fp32, computed like the reference."""
    def make():
        c = codebook.detach().to(device=device, dtype=torch.float32)
        return ((c[:-1] + c[1:]) / 2).contiguous()

    return cached("bounds", codebook, make, str(device))
