"""Input checks shared by the reference and the exporters.

Every failure is a ValueError that names the argument, the value seen and the
value expected, so that a bad call never turns into a silent wrong answer.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from tq_deploy.ops import SUPPORTED_BITS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"{name}={bits!r}, expected one of {SUPPORTED_BITS}")
    return int(bits)


def check_head_dim(name: str, dim: int, minimum: int = 2) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < minimum:
        raise ValueError(f"{name}={dim!r}, expected an int >= {minimum}")
    return int(dim)


def check_tensor(name: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
                 rank: int | None = None, min_rank: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} is a {type(value).__name__}, expected a torch.Tensor")
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name}.dtype={value.dtype}, expected one of {tuple(str(d) for d in dtypes)}")
    if rank is not None and value.dim() != rank:
        raise ValueError(f"{name} has rank {value.dim()} (shape {tuple(value.shape)}), expected rank {rank}")
    if min_rank is not None and value.dim() < min_rank:
        raise ValueError(f"{name} has rank {value.dim()} (shape {tuple(value.shape)}), expected rank >= {min_rank}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int | None]) -> torch.Tensor:
    """Check ``value.shape`` against ``expected``; None matches any size."""
    shape = tuple(value.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        parts = ["*" if e is None else str(e) for e in expected]
        shown = f"({parts[0]},)" if len(parts) == 1 else "(" + ", ".join(parts) + ")"
        raise ValueError(f"{name}.shape={shape}, expected {shown}")
    return value


def check_codebook(name: str, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    check_tensor(name, codebook, dtypes=(torch.float32,), rank=1)
    if codebook.numel() != 2**bits:
        raise ValueError(f"{name} has {codebook.numel()} entries, expected 2**bits = {2**bits}")
    return codebook


def check_rotation(name: str, rotation: torch.Tensor, dim: int) -> torch.Tensor:
    check_tensor(name, rotation, dtypes=(torch.float32,), rank=2)
    return check_shape(name, rotation, (dim, dim))


def check_last_dim(name: str, value: torch.Tensor, rotation: torch.Tensor) -> int:
    """The vectors' dimension must be the rotation's: names both sizes."""
    check_tensor("rotation", rotation, dtypes=(torch.float32,), rank=2)
    dim = rotation.shape[0]
    if value.shape[-1] != dim:
        seen = value.shape[-1]
        raise ValueError(f"{name}.shape[-1]={seen} but rotation.shape={tuple(rotation.shape)}: expected "
                         f"head_dim={dim} (or the rotation expected ({seen}, {seen}))")
    return dim
