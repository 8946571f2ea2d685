"""The CUDA backend: the kernels of plugins/kernels/cuda on torch tensors, through libtq_deploy_cuda.so.

The same launchers serve the ONNX Runtime CUDA kernels and the TensorRT plugins; here they are
called with ctypes on the caller's current stream. :data:`OPS` lists what this backend runs for
the dispatcher (:mod:`tq_deploy.dispatch`), as ``supports_<op>(args)`` and ``<op>(args)`` on the
checked arguments of :mod:`tq_deploy.reference.checks`. Nothing here imports Triton.

Every op takes bits 1-8 and fp32/fp16/bf16 inputs, and paged caches with fp32 or fp16 norms (keys
and values alike: the call's ``norm_dtype``); the paged attention runs the tensor-core kernel where
the shapes allow (:func:`paged_attention_path`) and the generic kernel elsewhere.
The library is found by :func:`tq_deploy.runtime.library.locate` (env ``TQ_DEPLOY_CUDA_LIBRARY``,
then tq_deploy/lib/, the installed distribution, build/*/ of a source checkout); it is built with
the package when nvcc is present (plugins/kernels/cuda).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

from tq_deploy import abi, ops
from tq_deploy.device_constants import cached, codebook_as, float_matrix
from tq_deploy.reference.checks import CacheUpdateArgs, DecodeArgs, EncodeArgs, PagedAttentionArgs
from tq_deploy.runtime import library as _library

NAME = "cuda"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # tq_cuda_dtype of tq_cuda.h
_NORM_DTYPES = {torch.float32: 0, torch.float16: 1}  # a paged cache's norms (norm_dtype, TN)
_BAD_ARGUMENT = 10001  # TQ_CUDA_BAD_ARGUMENT of tq_cuda.h
_MAX_DIM = {"encode": 8192, "decode": 8192, "cache_update": 8192, "paged_attention": 512}
_i64, _int, _p, _size = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t

# the op's call struct of tq_calls.h, built from the same field list (tq_deploy/abi.py)
_EncodeCall = abi.ctypes_struct(ops.ENCODE)
_DecodeCall = abi.ctypes_struct(ops.DECODE)
_CacheUpdateCall = abi.ctypes_struct(ops.CACHE_UPDATE)
_AttentionCall = abi.ctypes_struct(ops.PAGED_ATTENTION)


class _AttentionPlan(ctypes.Structure):
    """tq_cuda_paged_attention_plan_t of tq_cuda.h (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int32) for name in ("tensor_cores", "tiles_per_warp", "ctas_per_pair", "splits",
                                                    "tokens_per_split", "head_chunks", "code_alignment")]
    _fields_ += [("scale", ctypes.c_float)]
    _fields_ += [(name, _size) for name in ("counters_offset", "ml_offset", "acc_offset", "q_offset",
                                            "workspace_bytes")]


_SIGNATURES = {  # name: (restype, argtypes), as declared in tq_cuda.h
    "tq_cuda_build_info": (ctypes.c_char_p, []),
    "tq_cuda_error_string": (ctypes.c_char_p, [_int]),
    "tq_cuda_encode": (_int, [_p]),
    "tq_cuda_decode": (_int, [_p]),
    "tq_cuda_cache_update_workspace": (_size, [_p]),
    "tq_cuda_cache_update": (_int, [_p]),
    "tq_cuda_paged_attention_workspace": (_size, [_p]),
    "tq_cuda_paged_attention_plan": (_int, [_p, _i64, _p]),
    "tq_cuda_paged_attention_run": (_int, [_p, _p]),
    "tq_cuda_paged_attention": (_int, [_p]),
    "tq_cuda_paged_attention_path": (_int, [_p]),
}


def _raw_stream(device: torch.device):
    """The current CUDA stream's handle as an int (the cheap way when this torch has it)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: raw(device.index)
    return lambda: torch.cuda.current_stream(device).cuda_stream


def library_path() -> str:
    return _library.locate("cuda")


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(library_path())
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """Why this backend cannot run here ("" when it can): no CUDA device of compute capability
    >= 8.0, or libtq_deploy_cuda.so missing or not loadable."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        _lib()
    except (OSError, AttributeError, _library.NativeLibraryNotFoundError) as err:
        return f"libtq_deploy_cuda.so does not load: {err}"
    old = [i for i in range(torch.cuda.device_count()) if torch.cuda.get_device_capability(i)[0] < 8]
    return f"CUDA devices {old} have compute capability < 8.0" if old else ""


def available() -> bool:
    return not unavailable_reason()


def build_info() -> str:
    return _lib().tq_cuda_build_info().decode()


def _runs(device: torch.device, op: str, head_dim: int, *dtypes: torch.dtype) -> bool:
    return (device.type == "cuda" and head_dim <= _MAX_DIM[op] and all(d in _DTYPES for d in dtypes)
            and available())


def _dense(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def _norm_dtype(k_norms: torch.Tensor, v_norms: torch.Tensor) -> int:
    """The call's norm_dtype for a cache's norms (one type for keys and values); -1, which the
    library refuses, for any other pair."""
    return _NORM_DTYPES.get(k_norms.dtype, -1) if v_norms.dtype == k_norms.dtype else -1


def _check(rc: int, what: str, describe) -> None:
    if rc == _BAD_ARGUMENT:
        raise ValueError(f"the CUDA {what} refused {describe()}: outside the kernel's limits (tq_cuda.h)")
    if rc:
        raise RuntimeError(f"the CUDA {what} failed: {_lib().tq_cuda_error_string(rc).decode()} (error {rc})")


@contextlib.contextmanager
def _on(device: torch.device):
    """The library launches on the current device: make it the tensors' device for the call."""
    if device.index is None or device.index == torch.cuda.current_device():
        yield
    else:
        with torch.cuda.device(device):
            yield


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


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


# --- encode / decode ----------------------------------------------------------------------------

def supports_encode(a: EncodeArgs) -> bool:
    return _runs(a.device, "encode", a.head_dim, a.x.dtype)


def encode(a: EncodeArgs):
    """(codes [..., P] uint8, norms [...] fp32) of x [..., D]; see the reference encode."""
    lead, dev = a.x.shape[:-1], a.device
    x2 = a.x.reshape(-1, a.head_dim).contiguous()
    p = (a.head_dim * a.bits + 7) // 8
    codes = torch.empty((x2.shape[0], p), dtype=torch.uint8, device=dev)
    norms = torch.empty((x2.shape[0],), dtype=torch.float32, device=dev)
    rot, cb = float_matrix(a.rotation, dev), codebook_as(a.codebook, torch.float32, dev)
    with _on(dev):
        call = _EncodeCall(x=x2.data_ptr(), rotation=rot.data_ptr(), codebook=cb.data_ptr(), codes=codes.data_ptr(),
                           norms=norms.data_ptr(), rows=x2.shape[0], head_dim=a.head_dim, bits=a.bits,
                           dtype=_DTYPES[x2.dtype], stream=_stream(dev))
        rc = _lib().tq_cuda_encode(ctypes.byref(call))
    _check(rc, "encode", lambda: f"x {tuple(a.x.shape)} {a.x.dtype}, bits {a.bits}")
    return codes.reshape(*lead, p), norms.reshape(lead)


def supports_decode(a: DecodeArgs) -> bool:
    return _runs(a.device, "decode", a.head_dim, a.dtype)


def decode(a: DecodeArgs) -> torch.Tensor:
    """x_hat [..., D] in ``a.dtype``; see the reference decode."""
    lead, dev = a.codes.shape[:-1], a.device
    c2 = a.codes.reshape(-1, a.codes.shape[-1]).contiguous()
    n2 = a.norms.reshape(-1).contiguous()
    out = torch.empty((c2.shape[0], a.head_dim), dtype=torch.float32, device=dev)
    rot, cb = float_matrix(a.rotation, dev), codebook_as(a.codebook, torch.float32, dev)
    with _on(dev):
        call = _DecodeCall(codes=c2.data_ptr(), norms=n2.data_ptr(), rotation=rot.data_ptr(), codebook=cb.data_ptr(),
                           x_hat=out.data_ptr(), rows=c2.shape[0], head_dim=a.head_dim, bits=a.bits,
                           stream=_stream(dev))
        rc = _lib().tq_cuda_decode(ctypes.byref(call))
    _check(rc, "decode", lambda: f"codes {tuple(a.codes.shape)}, bits {a.bits}")
    return out.reshape(*lead, a.head_dim).to(a.dtype)


# --- cache update -------------------------------------------------------------------------------

def supports_cache_update(a: CacheUpdateArgs) -> bool:
    """In place into the caller's caches, so they must be dense (no copy could be written back)."""
    return (_runs(a.device, "cache_update", a.head_dim, a.key.dtype) and a.value.dtype == a.key.dtype
            and _norm_dtype(a.k_norms, a.v_norms) >= 0 and _dense(a.k_codes, a.k_norms, a.v_codes, a.v_norms))


def cache_update(a: CacheUpdateArgs):
    """Encode key/value [T, Hkv, D] into their paged slots, in place; slot < 0 skips the token and
    a slot named twice keeps its last token."""
    dev = a.device
    key, value = a.key.contiguous(), a.value.contiguous()
    slots = a.slot_mapping.to(torch.int64).contiguous()
    rot = float_matrix(a.rotation, dev)
    kcb = codebook_as(a.k_codebook, torch.float32, dev)
    vcb = kcb if a.v_codebook is a.k_codebook else codebook_as(a.v_codebook, torch.float32, dev)
    caches = [t.data_ptr() for t in (a.k_codes, a.k_norms, a.v_codes, a.v_norms)]
    with _on(dev):
        lib, stream = _lib(), _stream(dev)
        call = _CacheUpdateCall(
            key=key.data_ptr(), value=value.data_ptr(), slot_mapping=slots.data_ptr(), k_codes=caches[0],
            k_norms=caches[1], v_codes=caches[2], v_norms=caches[3], rotation=rot.data_ptr(),
            k_codebook=kcb.data_ptr(), v_codebook=vcb.data_ptr(), k_codes_out=caches[0], k_norms_out=caches[1],
            v_codes_out=caches[2], v_norms_out=caches[3], num_tokens=a.num_tokens, num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim, num_blocks=a.num_blocks, block_size=a.block_size, k_bits=a.k_bits,
            v_bits=a.v_bits, dtype=_DTYPES[key.dtype], norm_dtype=_norm_dtype(a.k_norms, a.v_norms),
            stream=stream)
        nbytes = lib.tq_cuda_cache_update_workspace(ctypes.byref(call))
        if nbytes:
            workspace = _workspace(dev, stream, nbytes)
            call.workspace, call.workspace_bytes = workspace.data_ptr(), workspace.numel()
        rc = lib.tq_cuda_cache_update(ctypes.byref(call))
    _check(rc, "cache update", lambda: f"key {tuple(a.key.shape)}, k_codes {tuple(a.k_codes.shape)}, "
                                       f"bits {a.k_bits}/{a.v_bits}")
    return a.k_codes, a.k_norms, a.v_codes, a.v_norms


# --- paged attention ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _path(hq, hkv, dim, block_size, k_bits, v_bits, dtype, key_mean: bool) -> int:
    # the library reads only whether the key mean's pointer is null: any non-null value stands for it
    call = _AttentionCall(num_q_heads=hq, num_kv_heads=hkv, head_dim=dim, block_size=block_size, k_bits=k_bits,
                          v_bits=v_bits, dtype=dtype, key_mean=1 if key_mean else None,
                          rope_inv_freq=1 if key_mean else None)
    return _lib().tq_cuda_paged_attention_path(ctypes.byref(call))


def paged_attention_path(a: PagedAttentionArgs) -> str:
    """"tensor-core" or "generic": the kernel these shapes and this query dtype run (16-byte aligned caches
    assumed; float32 queries run the float32 generic kernel, and so do calls with the key mean at head dims
    other than 64/128/256)."""
    fast = _path(a.num_q_heads, a.num_kv_heads, a.head_dim, a.block_size, a.k_bits, a.v_bits, _DTYPES[a.query.dtype],
                 a.key_mean is not None)
    return "tensor-core" if fast else "generic"


def supports_paged_attention(a: PagedAttentionArgs) -> bool:
    return (_runs(a.device, "paged_attention", a.head_dim, a.query.dtype)
            and _norm_dtype(a.k_norms, a.v_norms) >= 0 and _dense(a.k_codes, a.k_norms, a.v_codes, a.v_norms))


def _attention_call(a: PagedAttentionArgs, dev: torch.device):
    """The call's fields that stay fixed over a decode loop (the cache, constants, attributes), and
    the tensors that must stay alive while it is used."""
    rot = float_matrix(a.rotation, dev)
    kcb = codebook_as(a.k_codebook, torch.float32, dev)
    vcb = kcb if a.v_codebook is a.k_codebook else codebook_as(a.v_codebook, torch.float32, dev)
    # the key mean (optional, both or neither): float32, contiguous, on the device; null pointers without it
    mean = None if a.key_mean is None else _float32_on(a.key_mean, dev)
    freq = None if a.rope_inv_freq is None else _float32_on(a.rope_inv_freq, dev)
    call = _AttentionCall(
        k_codes=a.k_codes.data_ptr(), k_norms=a.k_norms.data_ptr(), v_codes=a.v_codes.data_ptr(),
        v_norms=a.v_norms.data_ptr(), rotation=rot.data_ptr(), k_codebook=kcb.data_ptr(), v_codebook=vcb.data_ptr(),
        key_mean=None if mean is None else mean.data_ptr(), rope_inv_freq=None if freq is None else freq.data_ptr(),
        num_q_heads=a.num_q_heads, head_dim=a.head_dim, num_blocks=a.num_blocks, block_size=a.block_size,
        num_kv_heads=a.num_kv_heads, k_bits=a.k_bits, v_bits=a.v_bits, scale=a.scale,
        dtype=_DTYPES[a.query.dtype], norm_dtype=_norm_dtype(a.k_norms, a.v_norms))
    return call, (a.k_codes, a.k_norms, a.v_codes, a.v_norms, rot, kcb, vcb, mean, freq)


def _float32_on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Contiguous float32 copy of a constant input on ``dev`` (made once while ``t`` lives unchanged)."""
    return cached("f32", t, lambda: t.detach().to(device=dev, dtype=torch.float32).contiguous(), str(dev))


def _plan(call, tokens_per_split: int, describe) -> _AttentionPlan:
    plan = _AttentionPlan()
    _check(_lib().tq_cuda_paged_attention_plan(ctypes.byref(call), tokens_per_split, ctypes.byref(plan)),
           "paged attention", describe)
    return plan


def paged_attention(a: PagedAttentionArgs, *, tokens_per_split: int = 0) -> torch.Tensor:
    """out [S, Hq, D] in the query's dtype (see the reference paged attention); tokens_per_split = 0
    lets the library pick the split-K from the shapes (a knob for the benchmark)."""
    dev = a.device
    out = torch.empty(a.query.shape, dtype=a.query.dtype, device=dev)
    if a.num_seqs == 0:
        return out
    q = a.query.contiguous()
    bt, ctx = a.block_tables.contiguous(), a.context_lens.contiguous()
    call, _keep = _attention_call(a, dev)
    call.query, call.block_tables, call.context_lens, call.out = q.data_ptr(), bt.data_ptr(), ctx.data_ptr(), \
        out.data_ptr()
    call.num_seqs, call.max_blocks = a.num_seqs, a.max_blocks

    def describe():
        return (f"query {tuple(q.shape)} {q.dtype}, k_codes {tuple(a.k_codes.shape)}, bits {a.k_bits}/{a.v_bits}, "
                f"tokens_per_split {tokens_per_split}")

    with _on(dev):  # the split depends on the device's SM count
        stream = _stream(dev)
        plan = _plan(call, tokens_per_split, describe)
        workspace = _workspace(dev, stream, plan.workspace_bytes)
        call.workspace, call.workspace_bytes, call.stream = workspace.data_ptr(), workspace.numel(), stream
        rc = _lib().tq_cuda_paged_attention_run(ctypes.byref(plan), ctypes.byref(call))
    _check(rc, "paged attention", describe)
    return out


class PagedAttentionPlan:
    """The CUDA paged attention for one cache, checked once and run many times (a decode loop).

    Everything that stays fixed over a serving loop (the cache tensors, rotation, codebooks, key mean,
    bits, scale, head counts, query dtype) is checked and resolved here, and the library's plan
    (tq_cuda_paged_attention_plan: shape checks, kernel and split choice, workspace size) is made
    once per (S, M) of the step; :meth:`run` then only reads the per-step tensors' pointers, after
    the few checks that keep the kernel inside them (query [S, Hq, D] of the plan's dtype, int32
    tables [S, M] and context lengths [S], contiguous, on the plan's device), and runs the plan.
    The launch allocates nothing but ``out`` and synchronizes nothing, so a CUDA graph can capture it.
    """

    def __init__(self, a: PagedAttentionArgs, tokens_per_split: int = 0):
        if not supports_paged_attention(a):
            raise ValueError(f"the CUDA backend does not take this call: {unavailable_reason() or 'strided caches'}")
        dev = a.device if a.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = dev, a.query.dtype
        self.num_q_heads, self.head_dim = a.num_q_heads, a.head_dim
        self.path = paged_attention_path(a)
        self.tokens_per_split = tokens_per_split
        self._call, self._keep = _attention_call(a, dev)  # _keep: alive while planned
        self._call_ref = ctypes.byref(self._call)
        self._fn = _lib().tq_cuda_paged_attention_run
        self._stream = _raw_stream(dev)
        self._tail = (a.num_q_heads, a.head_dim)
        self._plans: dict = {}

    def _planned(self, num_seqs: int, max_blocks: int, stream: int):
        """(plan, its byref, workspace) of a step of S = num_seqs and M = max_blocks on this stream."""
        key = (num_seqs, max_blocks, stream)
        planned = self._plans.get(key)
        if planned is None:
            c = self._call
            c.num_seqs, c.max_blocks = num_seqs, max_blocks
            with torch.cuda.device(self.device):
                plan = _plan(c, self.tokens_per_split, lambda: f"S {num_seqs}, M {max_blocks}")
            ws = _workspace(self.device, stream, plan.workspace_bytes)
            planned = self._plans[key] = (plan, ctypes.byref(plan), ws)
        return planned

    def run(self, query: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """out [S, Hq, D] (written into ``out`` when given) for this step's queries and tables."""
        s = query.shape[0]
        device = self.device
        if (query.dtype != self.dtype or query.device != device or query.shape[1:] != self._tail
                or not query.is_contiguous() or block_tables.dtype != torch.int32 or block_tables.dim() != 2
                or block_tables.shape[0] != s or not block_tables.is_contiguous() or block_tables.device != device
                or context_lens.dtype != torch.int32 or context_lens.shape != (s,) or not context_lens.is_contiguous()
                or context_lens.device != device or (out is not None and (out.shape != query.shape
                                                                          or out.dtype != self.dtype
                                                                          or out.device != device
                                                                          or not out.is_contiguous()))):
            raise ValueError(
                f"query {query.dtype} {tuple(query.shape)} on {query.device}, block_tables {block_tables.dtype} "
                f"{tuple(block_tables.shape)}, context_lens {context_lens.dtype} {tuple(context_lens.shape)}: "
                f"expected contiguous query {self.dtype} [S, {self.num_q_heads}, {self.head_dim}] (and out alike), "
                f"int32 [S, M] tables and int32 [S] context lengths on {device} (the plan's)")
        if out is None:
            out = torch.empty_like(query)
        if s == 0:
            return out
        stream = self._stream()
        m = block_tables.shape[1]
        _, plan_ref, ws = self._planned(s, m, stream)
        c = self._call
        c.query, c.num_seqs, c.block_tables, c.max_blocks = query.data_ptr(), s, block_tables.data_ptr(), m
        c.context_lens, c.out, c.stream = context_lens.data_ptr(), out.data_ptr(), stream
        c.workspace, c.workspace_bytes = ws.data_ptr(), ws.numel()
        rc = self._fn(plan_ref, self._call_ref)
        if rc:
            _check(rc, "paged attention", lambda: f"query {tuple(query.shape)}, tables {tuple(block_tables.shape)}")
        return out


# op -> (supports(args) -> bool, run(args))
OPS = {
    "encode": (supports_encode, encode),
    "decode": (supports_decode, decode),
    "cache_update": (supports_cache_update, cache_update),
    "paged_attention": (supports_paged_attention, paged_attention),
}
