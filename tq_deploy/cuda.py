"""The CUDA backend: the kernels of plugins/kernels/cuda on torch tensors, through libtq_deploy_cuda.so.

The same launchers serve the ONNX Runtime CUDA kernels and the TensorRT plugins; here they are
called with ctypes on the caller's current stream. :data:`OPS` lists what this backend runs for
the dispatcher (:mod:`tq_deploy.dispatch`), as ``supports_<op>(args)`` and ``<op>(args)`` on the
checked arguments of :mod:`tq_deploy.reference.checks`. Nothing here imports Triton.

The library is found by :func:`tq_deploy.runtime.library.locate` (env ``TQ_DEPLOY_CUDA_LIBRARY``,
then tq_deploy/lib/, the installed distribution, build/*/ of a source checkout); it is built with
the package when nvcc is present (plugins/kernels/cuda).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tq_deploy.device_constants import codebook_as, float_matrix
from tq_deploy.reference.checks import PagedAttentionArgs
from tq_deploy.runtime import library as _library

NAME = "cuda"
_FLOAT32, _FLOAT16 = 0, 1
_QUERY_TYPES = {torch.float32: _FLOAT32, torch.float16: _FLOAT16}
_i64, _p = ctypes.c_int64, ctypes.c_void_p
_BAD_ARGUMENT = 10001  # TQ_CUDA_BAD_ARGUMENT of tq_cuda.h


def library_path() -> str:
    return _library.locate("cuda")


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
def unavailable_reason() -> str:
    """Why this backend cannot run here ("" when it can): no CUDA device of compute capability
    >= 8.0, or libtq_deploy_cuda.so missing or not loadable."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        _lib()
    except (OSError, _library.NativeLibraryNotFoundError) as err:
        return f"libtq_deploy_cuda.so does not load: {err}"
    old = [i for i in range(torch.cuda.device_count()) if torch.cuda.get_device_capability(i)[0] < 8]
    return f"CUDA devices {old} have compute capability < 8.0" if old else ""


def available() -> bool:
    return not unavailable_reason()


@functools.lru_cache(maxsize=1024)
def _shape_supported(hq, hkv, dim, block_size, k_bits, v_bits) -> bool:
    return bool(_lib().tq_cuda_paged_attention_mma_supported(hq, hkv, dim, block_size, k_bits, v_bits))


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def supports_paged_attention(a: PagedAttentionArgs) -> bool:
    """The tensor-core kernel's shapes (tq_cuda.h): fp16/fp32 queries, contiguous 16-byte aligned caches."""
    return (a.device.type == "cuda" and a.query.dtype in _QUERY_TYPES and available()
            and _shape_supported(a.num_q_heads, a.num_kv_heads, a.head_dim, a.block_size, a.k_bits, a.v_bits)
            and _aligned(a.k_codes) and _aligned(a.v_codes) and a.k_norms.is_contiguous()
            and a.v_norms.is_contiguous())


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(s, hq, hkv, dim, max_blocks, page, tokens_per_split, device) -> int:
    with torch.cuda.device(device):  # the split depends on the device's SM count
        return _lib().tq_cuda_paged_attention_mma_workspace(s, hq, hkv, dim, max_blocks, page, tokens_per_split)


# One workspace per (device, stream), grown when a call needs more: kernels on one stream run in
# order, so calls on it can share the bytes; other streams get their own.
_workspaces: dict = {}


def _workspace(device: torch.device, stream: int, nbytes: int) -> torch.Tensor:
    key = (device, stream)
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
        _workspaces[key] = ws
    return ws


def paged_attention(a: PagedAttentionArgs, *, tokens_per_split: int = 0) -> torch.Tensor:
    """out [S, Hq, D] in the query's dtype (see the reference paged attention); tokens_per_split = 0
    lets the library pick the split-K from the shapes (a knob for the benchmark)."""
    dev = a.device
    out = torch.empty(a.query.shape, dtype=a.query.dtype, device=dev)
    if a.num_seqs == 0:
        return out
    q = a.query.contiguous()
    bt, ctx = a.block_tables.contiguous(), a.context_lens.contiguous()
    rot = float_matrix(a.rotation, dev)
    kcb = codebook_as(a.k_codebook, torch.float32, dev)
    vcb = kcb if a.v_codebook is a.k_codebook else codebook_as(a.v_codebook, torch.float32, dev)
    nbytes = _workspace_bytes(a.num_seqs, a.num_q_heads, a.num_kv_heads, a.head_dim, a.max_blocks, a.block_size,
                              tokens_per_split, dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    workspace = _workspace(dev, stream, nbytes)
    if dev.index not in (None, torch.cuda.current_device()):  # the library launches on the current device
        with torch.cuda.device(dev):
            return _launch(a, q, bt, ctx, rot, kcb, vcb, tokens_per_split, workspace, out, stream)
    return _launch(a, q, bt, ctx, rot, kcb, vcb, tokens_per_split, workspace, out, stream)


def _launch(a, q, bt, ctx, rot, kcb, vcb, tokens_per_split, workspace, out, stream):
    rc = _lib().tq_cuda_paged_attention_mma(
        q.data_ptr(), _QUERY_TYPES[q.dtype], a.num_seqs, a.num_q_heads, a.num_kv_heads, a.head_dim,
        a.k_codes.data_ptr(), a.k_norms.data_ptr(), a.v_codes.data_ptr(), a.v_norms.data_ptr(), a.num_blocks,
        a.block_size, bt.data_ptr(), a.max_blocks, ctx.data_ptr(), rot.data_ptr(), kcb.data_ptr(), vcb.data_ptr(),
        a.k_bits, a.v_bits, a.scale, tokens_per_split, workspace.data_ptr(), workspace.numel(), out.data_ptr(),
        stream)
    if rc == _BAD_ARGUMENT:
        raise ValueError(
            f"the CUDA decode attention refused query {q.dtype} {tuple(q.shape)}, k_codes {tuple(a.k_codes.shape)}, "
            f"bits {a.k_bits}/{a.v_bits}: expected fp16/fp32 queries, k/v bits in (2, 4), head dim 64/128/256, "
            "<= 8 query heads per KV head, block size a multiple of 16, 16-byte aligned contiguous codes "
            "(supports_paged_attention says which calls it takes)")
    if rc:
        raise RuntimeError(f"tq_cuda_paged_attention_mma failed with CUDA error {rc}")
    return out


# op -> (supports(args) -> bool, run(args))
OPS = {
    "paged_attention": (supports_paged_attention, paged_attention),
}
