"""Encode, Decode and CacheUpdate on the Triton kernels (same signatures as the reference)."""

from __future__ import annotations

import torch

from . import _common as C
from ._dot import interpreting
from ._quant_kernels import decode_kernel, encode_kernel

_ENCODE_BLOCK_R = 64
_DECODE_BLOCK_R = 32


def _rot_args(x_dtype, rotation, device):
    parts = C.rotation_parts(rotation, x_dtype, device)
    fp32 = x_dtype == torch.float32
    nparts = len(parts)
    padded = parts + (parts[0],) * (3 - nparts)
    scale = C.PART_SCALE.get(x_dtype, 1.0)
    return padded, nparts, scale, fp32


def _launch_encode(x2, rotation, codebook, bits, codes, norms, slot_mapping=None, heads=1):
    """x2 [R, D] (rows contiguous) -> codes rows / norms, optionally through slots."""
    n_rows, dim = x2.shape
    (r0, r1, r2), nparts, scale, fp32 = _rot_args(x2.dtype, rotation, x2.device)
    bounds = C.boundaries(codebook, x2.device)
    bj = min(dim, 64)
    block_r = _ENCODE_BLOCK_R if dim <= 128 else 32
    grid = (triton_cdiv(n_rows, block_r),)
    if n_rows == 0:
        return
    encode_kernel[grid](
        x2, r0, r1, r2, bounds, C.as_words(codes), codes, norms,
        slot_mapping if slot_mapping is not None else norms,
        n_rows, x2.stride(0), heads,
        D=dim, BITS=bits, BLOCK_R=block_r, BJ=bj, NPARTS=nparts, PART_SCALE=scale, FP32=fp32,
        USE_SLOTS=slot_mapping is not None, UPCAST=interpreting() and x2.dtype == torch.bfloat16, num_warps=4,
    )


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def encode(x: torch.Tensor, rotation: torch.Tensor, codebook: torch.Tensor, bits: int):
    """(codes [..., P] uint8, norms [...] fp32) of x [..., D]; see the reference encode."""
    C.check_bits("bits", bits)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    dim = C.check_dim("x", x.shape[-1])
    C.check_rotation(rotation, dim)
    C.check_codebook("codebook", codebook, bits)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    p = C.packed_size(dim, bits)
    codes = torch.empty((x2.shape[0], p), dtype=torch.uint8, device=x.device)
    norms = torch.empty((x2.shape[0],), dtype=torch.float32, device=x.device)
    _launch_encode(x2, rotation, codebook, bits, codes, norms)
    return codes.reshape(*lead, p), norms.reshape(lead)


def decode(codes: torch.Tensor, norms: torch.Tensor, rotation: torch.Tensor, codebook: torch.Tensor, bits: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat [..., D] = norm * (c[code] @ Pi); see the reference decode."""
    C.check_bits("bits", bits)
    dim = rotation.shape[-1]
    C.check_dim("rotation", dim)
    C.check_rotation(rotation, dim)
    C.check_codebook("codebook", codebook, bits)
    p = C.packed_size(dim, bits)
    if codes.dtype != torch.uint8 or codes.shape[-1] != p:
        raise ValueError(f"codes: dtype {codes.dtype} shape {tuple(codes.shape)}, expected uint8 [..., {p}]")
    if tuple(norms.shape) != tuple(codes.shape[:-1]):
        raise ValueError(f"norms: shape {tuple(norms.shape)}, expected {tuple(codes.shape[:-1])}")
    lead = codes.shape[:-1]
    c2 = codes.reshape(-1, p).contiguous()
    n2 = norms.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty((c2.shape[0], dim), dtype=torch.float32, device=codes.device)
    if c2.shape[0]:
        cb = C.codebook_as(codebook, torch.float32, codes.device)
        rot = C.float_matrix(rotation, codes.device, transpose=False)
        grid = (triton_cdiv(c2.shape[0], _DECODE_BLOCK_R),)
        decode_kernel[grid](C.as_words(c2), c2, n2, cb, rot, out, c2.shape[0],
                            D=dim, BITS=bits, BLOCK_R=_DECODE_BLOCK_R, BJ=min(dim, 64), num_warps=4)
    return out.reshape(*lead, dim).to(dtype)


def cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation, k_codebook, v_codebook,
                 k_bits, v_bits):
    """Encode key/value [T, Hkv, D] into their paged slots, in place; slot < 0 skips the token."""
    C.check_bits("k_bits", k_bits)
    C.check_bits("v_bits", v_bits)
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key/value: shapes {tuple(key.shape)}/{tuple(value.shape)}, expected equal [T, Hkv, D]")
    t, heads, dim = key.shape
    C.check_dim("key", dim)
    C.check_rotation(rotation, dim)
    C.check_dtype("key", key, C.FLOAT_DTYPES)
    C.check_codebook("k_codebook", k_codebook, k_bits)
    C.check_codebook("v_codebook", v_codebook, v_bits)
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping: shape {tuple(slot_mapping.shape)}, expected ({t},)")
    for name, codes, norms, bits in (("k", k_codes, k_norms, k_bits), ("v", v_codes, v_norms, v_bits)):
        p = C.packed_size(dim, bits)
        if codes.dim() != 4 or codes.shape[2:] != (heads, p) or codes.dtype != torch.uint8:
            raise ValueError(f"{name}_codes: {codes.dtype} {tuple(codes.shape)}, expected uint8 [N, B, {heads}, {p}]")
        if norms.shape != codes.shape[:3] or norms.dtype != torch.float32:
            raise ValueError(f"{name}_norms: {norms.dtype} {tuple(norms.shape)}, expected float32 {tuple(codes.shape[:3])}")
        if not (codes.is_contiguous() and norms.is_contiguous()):
            raise ValueError(f"{name}_codes/{name}_norms must be contiguous for the in-place Triton update")
    slots = slot_mapping.to(torch.int64).contiguous()
    for src, codes, norms, cb, bits in ((key, k_codes, k_norms, k_codebook, k_bits),
                                         (value, v_codes, v_norms, v_codebook, v_bits)):
        x2 = src.reshape(t * heads, dim)
        if x2.stride(-1) != 1 or (t * heads > 1 and x2.stride(0) != dim):
            x2 = x2.contiguous()
        _launch_encode(x2, rotation, cb, bits, codes, norms, slot_mapping=slots, heads=heads)
    return k_codes, k_norms, v_codes, v_norms
