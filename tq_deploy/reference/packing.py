"""Bit packing of quantization codes.

The packed form of a vector's D codes is a little-endian bit stream: code i
occupies bits [i*b, (i+1)*b), counting from bit 0 (the least significant) of
byte 0. It takes ceil(D*b/8) bytes. For b = 1, 2, 4 the codes of a byte never
straddle it (8/b codes per byte, first code in the low bits); for b = 3 every
8 codes fill exactly 3 bytes, and codes 2 and 5 of each group straddle a byte
boundary. Trailing bits of the last byte are zero. docs/ops.md shows examples.
"""

from __future__ import annotations

import torch

from tq_deploy.ops import packed_size
from tq_deploy.reference.checks import check_bits, check_head_dim, check_tensor


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] with values < 2**bits -> packed uint8 [..., ceil(D*bits/8)]."""
    check_bits("bits", bits)
    check_tensor("codes", codes, dtypes=(torch.uint8,), min_rank=1)
    dim = codes.shape[-1]
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes has value {int(codes.max())}, expected values < 2**bits = {2**bits}")
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*codes.shape[:-1], dim * bits)
    nbytes = packed_size(dim, bits)
    pad = nbytes * 8 - dim * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(*codes.shape[:-1], nbytes, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Packed uint8 [..., ceil(dim*bits/8)] -> uint8 codes [..., dim]."""
    check_bits("bits", bits)
    check_head_dim("dim", dim, minimum=1)
    check_tensor("packed", packed, dtypes=(torch.uint8,), min_rank=1)
    nbytes = packed_size(dim, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"packed.shape[-1]={packed.shape[-1]}, expected ceil(dim*bits/8) = {nbytes} for dim={dim}, bits={bits}")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], nbytes * 8)[..., : dim * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(*packed.shape[:-1], dim, bits) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
