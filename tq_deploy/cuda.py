"""The CUDA kernels of plugins/kernels/cuda on torch tensors, through libtq_deploy_cuda.so (ctypes).

Today this runs the tensor-core paged decode attention (``tq_cuda_paged_attention_mma``): the
reference's :func:`tq_deploy.reference.paged.paged_attention` takes it on CUDA tensors when the
library is built and the shape is supported (k_bits, v_bits in {2, 4}; head dim 64/128/256; at
most 8 query heads per KV head; block size a multiple of 16; fp16/fp32 queries), and the Triton
kernel otherwise. ``TQ_DEPLOY_BACKEND=triton`` skips this path.

The library is found through ``TQ_DEPLOY_CUDA_LIBRARY``, then tq_deploy/lib/, the installed
distribution, and build/*/kernels/cuda/ of a source checkout; it is built with the package when
nvcc is present (plugins/kernels/cuda).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math

import torch

from tq_deploy.runtime import library as _library

ENV_VAR = "TQ_DEPLOY_CUDA_LIBRARY"
LIBRARY_NAME = "libtq_deploy_cuda.so"
_FLOAT32, _FLOAT16 = 0, 1
_QUERY_TYPES = {torch.float32: _FLOAT32, torch.float16: _FLOAT16}
_i64, _p = ctypes.c_int64, ctypes.c_void_p


class CudaLibraryNotFoundError(FileNotFoundError):
    """libtq_deploy_cuda.so is not built or not where tq_deploy looks for it."""


def library_path() -> str:
    return _library.locate_native(
        LIBRARY_NAME, "CUDA kernel library", ENV_VAR, _library.native_candidates(LIBRARY_NAME, "kernels/cuda"),
        CudaLibraryNotFoundError,
        "It is built by `pip install .` when nvcc is present, or by "
        "`cmake -S plugins -B build/native && cmake --build build/native`.",
    )


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(library_path())
    lib.tq_cuda_paged_attention_mma_supported.argtypes = [_i64, _i64, _i64, _i64, ctypes.c_int, ctypes.c_int]
    lib.tq_cuda_paged_attention_mma_supported.restype = ctypes.c_int
    lib.tq_cuda_paged_attention_mma_workspace.argtypes = [_i64] * 7
    lib.tq_cuda_paged_attention_mma_workspace.restype = ctypes.c_size_t
    lib.tq_cuda_paged_attention_mma.argtypes = (
        [_p, ctypes.c_int, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _i64, _i64, _p, _i64, _p, _p, _p, _p,
         ctypes.c_int, ctypes.c_int, ctypes.c_float, _i64, _p, ctypes.c_size_t, _p, _p]
    )
    lib.tq_cuda_paged_attention_mma.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when libtq_deploy_cuda.so loads and a CUDA device of compute capability >= 8.0 is present."""
    if not torch.cuda.is_available():
        return False
    try:
        _lib()
    except (OSError, CudaLibraryNotFoundError):
        return False
    return all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(torch.cuda.device_count()))


def supports_paged_attention(query, k_codes, k_bits: int, v_bits: int, v_codes=None) -> bool:
    """True when the tensor-core kernel takes this call (shapes, dtypes, device, and 16-byte aligned
    codes where they are contiguous already: other layouts are copied to fresh tensors)."""
    if query.dim() != 3 or k_codes.dim() != 4 or query.dtype not in _QUERY_TYPES:
        return False
    if any(c is not None and c.is_contiguous() and c.data_ptr() % 16 for c in (k_codes, v_codes)):
        return False
    if not (query.is_cuda and k_codes.is_cuda) or not available():
        return False
    hq, dim = query.shape[1], query.shape[2]
    _, block_size, hkv, _ = k_codes.shape
    if hkv == 0 or hq % hkv:
        return False
    return _shape_supported(hq, hkv, dim, block_size, k_bits, v_bits)


@functools.lru_cache(maxsize=1024)
def _shape_supported(hq, hkv, dim, block_size, k_bits, v_bits) -> bool:
    # asked by the dispatcher and again by paged_attention on every call: one ctypes call per shape
    return bool(_lib().tq_cuda_paged_attention_mma_supported(hq, hkv, dim, block_size, k_bits, v_bits))


_NO_GUARD = contextlib.nullcontext()


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(s, hq, hkv, dim, max_blocks, page, tokens_per_split, device) -> int:
    with torch.cuda.device(device):  # the split depends on the device's SM count
        return _lib().tq_cuda_paged_attention_mma_workspace(s, hq, hkv, dim, max_blocks, page, tokens_per_split)


def paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                    k_codebook, v_codebook, k_bits, v_bits, scale=0.0, *, tokens_per_split: int = 0):
    """out [S, Hq, D] in query's dtype (see the reference paged_attention); tokens_per_split = 0
    lets the library pick the split-K from the shapes (a knob for the benchmark)."""
    from tq_deploy.triton import _common as C
    from tq_deploy.triton.attention import _check

    s, hq, dim, n, page, hkv = _check(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                      rotation, k_codebook, v_codebook, k_bits, v_bits)
    kc, vc = k_codes.contiguous(), v_codes.contiguous()
    for name, t in (("k_codes", kc), ("v_codes", vc)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: data pointer {t.data_ptr():#x} is not 16-byte aligned (expected a fresh tensor)")
    if not supports_paged_attention(query, kc, k_bits, v_bits):
        raise ValueError(
            f"query {query.dtype} {tuple(query.shape)}, k_codes {tuple(k_codes.shape)}, bits {k_bits}/{v_bits}: "
            "expected CUDA tensors, fp16/fp32 query, k/v bits in {2, 4}, head dim 64/128/256, <= 8 query heads "
            "per KV head, block size a multiple of 16"
        )
    dev = query.device
    out = torch.empty(query.shape, dtype=query.dtype, device=dev)
    if s == 0:
        return out
    q = query.contiguous()
    kn, vn = k_norms.contiguous(), v_norms.contiguous()
    bt, ctx = block_tables.contiguous(), context_lens.contiguous()
    rot = C.float_matrix(rotation, dev, transpose=False)
    kcb = C.codebook_as(k_codebook, torch.float32, dev)
    vcb = C.codebook_as(v_codebook, torch.float32, dev)
    lib = _lib()
    max_blocks = bt.shape[1]
    nbytes = _workspace_bytes(s, hq, hkv, dim, max_blocks, page, tokens_per_split, dev)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
    sm_scale = scale if scale > 0 else 1.0 / math.sqrt(dim)
    # the library launches on the current device: switch only when the tensors live elsewhere
    guard = torch.cuda.device(dev) if dev.index not in (None, torch.cuda.current_device()) else _NO_GUARD
    with guard:
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.tq_cuda_paged_attention_mma(
            q.data_ptr(), _QUERY_TYPES[q.dtype], s, hq, hkv, dim, kc.data_ptr(), kn.data_ptr(), vc.data_ptr(),
            vn.data_ptr(), n, page, bt.data_ptr(), max_blocks, ctx.data_ptr(), rot.data_ptr(), kcb.data_ptr(),
            vcb.data_ptr(), k_bits, v_bits, sm_scale, tokens_per_split, workspace.data_ptr(), nbytes, out.data_ptr(),
            stream)
    if rc:
        raise RuntimeError(f"tq_cuda_paged_attention_mma failed with code {rc} (10001 = bad argument, else a CUDA error)")
    return out
