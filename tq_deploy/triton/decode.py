"""TQDecode on Triton: x_hat = norm * (c[code] @ Pi), fp32 product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tq_deploy.device_constants import codebook_as, float_matrix
from tq_deploy.ops import packed_size
from tq_deploy.reference.checks import DecodeArgs

from . import _common as C
from ._bits import unpack_codes_masked

_BLOCK_R = 32


@triton.jit
def decode_kernel(words_ptr, bytes_ptr, norms_ptr, cb_ptr, rot_ptr, out_ptr, n_rows,
                  D: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BJ: tl.constexpr):
    """out[r] = norm[r] * (c[code[r]] @ Pi), Pi [D, D] fp32 row-major."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    codes = unpack_codes_masked(words_ptr, bytes_ptr, rows64, rmask, BLOCK_R, D, BITS)
    vals = tl.load(cb_ptr + codes)
    norm = tl.load(norms_ptr + rows64, mask=rmask, other=0.0)
    for jc in tl.static_range(D // BJ):
        cols = jc * BJ + tl.arange(0, BJ)
        rot = tl.load(rot_ptr + tl.arange(0, D)[:, None] * D + cols[None, :])
        acc = tl.dot(vals, rot, input_precision="ieee") * norm[:, None]
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def supports_decode(a: DecodeArgs) -> bool:
    return C.runs_here(a.device) and a.head_dim in C.SUPPORTED_DIMS and a.bits in C.SUPPORTED_BITS


def decode(a: DecodeArgs) -> torch.Tensor:
    """x_hat [..., D] in ``a.dtype``; see the reference decode."""
    dim, p = a.head_dim, packed_size(a.head_dim, a.bits)
    lead = a.codes.shape[:-1]
    c2 = a.codes.reshape(-1, p).contiguous()
    if c2.storage_offset() % 4:  # the kernel reads int32 words
        c2 = c2.clone()
    n2 = a.norms.reshape(-1).contiguous()
    out = torch.empty((c2.shape[0], dim), dtype=torch.float32, device=a.device)
    if c2.shape[0]:
        decode_kernel[(C.cdiv(c2.shape[0], _BLOCK_R),)](
            C.as_words(c2), c2, n2, codebook_as(a.codebook, torch.float32, a.device),
            float_matrix(a.rotation, a.device), out, c2.shape[0],
            D=dim, BITS=a.bits, BLOCK_R=_BLOCK_R, BJ=min(dim, 64), num_warps=4)
    return out.reshape(*lead, dim).to(a.dtype)
