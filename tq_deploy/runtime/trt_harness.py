"""Drive one TensorRT plugin's enqueue without TensorRT (libtq_trt_harness.so), for the GPU tests.

The harness does to a plugin what TensorRT does around an engine (creator -> createPlugin(build)
-> configure -> serialize fields -> createPlugin(runtime) -> attachToContext -> onShapeChange ->
enqueue), on caller-owned torch CUDA tensors. TensorRT-RTX refuses compute capability 9.0
(H100/H200), so this is how the plugins' runtime path runs there.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence

from tq_deploy import ops
from tq_deploy.runtime import library as native


# nvinfer1::DataType values (NvInferRuntimeBase.h)
_TRT_DTYPE = {"float32": 0, "float16": 1, "int8": 2, "int32": 3, "uint8": 5, "int64": 8}


def harness_enqueue(op_name: str, attrs: Mapping[str, float], inputs: Sequence, outputs: Sequence, *,
                    stream: int = 0, library: str | os.PathLike | None = None,
                    harness: str | os.PathLike | None = None, dry_run: bool = False, repeat: int = 1,
                    attr_kinds: Mapping[str, str] | None = None) -> int:
    """Drive plugin ``op_name`` as TensorRT would (creator -> createPlugin(build) -> configure ->
    serialize fields -> createPlugin(runtime) -> attachToContext -> onShapeChange -> enqueue) on
    torch CUDA tensors, writing into ``outputs``. Codes tensors travel as int8 (TensorRT has no uint8
    plugin I/O: tq_deploy.runtime.tensorrt).
    The workspace is allocated here, as TensorRT would, from the plugin's getWorkspaceSize;
    ``repeat`` enqueues that many times back to back (for timing). Returns the workspace bytes.
    Raises RuntimeError with the harness's message on any refusal. Does not synchronize.
    ``dry_run=True`` stops before enqueue: then CPU tensors are fine (no pointer is read), which
    checks attribute parsing, dtypes, formats, shape checks and field serialization without a GPU.
    ``attr_kinds`` ("int" or "float" by name) overrides the contract's field types, so a test can hand
    the plugin what a bad model would: an unknown name, an INT where a FLOAT belongs.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat={repeat!r}, expected an int >= 1")
    if op_name not in ops.OPS_BY_NAME:
        raise ValueError(f"op_name={op_name!r}, expected one of {sorted(ops.OPS_BY_NAME)}")
    spec = ops.OPS_BY_NAME[op_name]
    required = len(spec.required_inputs())
    if not required <= len(inputs) <= len(spec.inputs) or len(outputs) != len(spec.outputs):
        expected = f"{required}" if required == len(spec.inputs) else f"{required} to {len(spec.inputs)}"
        raise ValueError(f"{op_name}: {len(inputs)} inputs / {len(outputs)} outputs, expected "
                         f"{expected} / {len(spec.outputs)}")
    lib = ctypes.CDLL(os.fspath(harness) if harness else native.locate("trt_harness"))
    plugin = os.fspath(library) if library else native.locate("trt")

    def describe(tensors):
        types, ranks, dims, ptrs = [], [], [], []
        for t in tensors:
            if not (t.is_cuda or dry_run) or not t.is_contiguous():
                raise ValueError(f"{op_name}: tensors must be contiguous CUDA tensors, got device={t.device}")
            dtype = str(t.dtype).replace("torch.", "")
            types.append(_TRT_DTYPE["int8" if dtype == "uint8" else dtype])
            ranks.append(t.dim())
            dims.extend(list(t.shape) + [0] * (8 - t.dim()))
            ptrs.append(t.data_ptr())
        n = len(tensors)
        return ((ctypes.c_int * n)(*types), (ctypes.c_int * n)(*ranks), (ctypes.c_int64 * (8 * n))(*dims),
                (ctypes.c_void_p * n)(*ptrs))

    names = list(attrs)
    field_names = (ctypes.c_char_p * len(names))(*[n.encode() for n in names])
    values = (ctypes.c_double * len(names))(*[float(attrs[n]) for n in names])
    kinds = {n: (attr_kinds or {}).get(n) or spec.attribute(n).kind for n in names}
    is_float = (ctypes.c_int * len(names))(*[kinds[n] == "float" for n in names])
    in_t, in_r, in_d, in_p = describe(inputs)
    out_t, out_r, out_d, out_p = describe(outputs)
    fn = lib.tq_trt_harness_enqueue
    fn.restype = ctypes.c_int

    def call(workspace, workspace_bytes, skip):
        message = ctypes.create_string_buffer(1024)
        needed = ctypes.c_size_t(0)
        rc = fn(plugin.encode(), op_name.encode(), len(names), field_names, values, is_float,
                len(inputs), in_t, in_r, in_d, in_p, len(outputs), out_t, out_r, out_d, out_p,
                ctypes.c_void_p(stream), ctypes.c_void_p(workspace), ctypes.c_size_t(workspace_bytes), repeat,
                ctypes.byref(needed), int(skip), message, len(message))
        if rc != 0:
            raise RuntimeError(f"{op_name} plugin harness: {message.value.decode(errors='replace')}")
        return needed.value

    needed = call(None, 0, skip=True)
    if dry_run:
        return needed
    if not needed:
        call(None, 0, skip=False)
        return 0
    import torch

    workspace = torch.empty(needed, dtype=torch.uint8, device=outputs[0].device)
    call(workspace.data_ptr(), needed, skip=False)
    # the enqueued kernels (on ``stream``, maybe not torch's) read the workspace after this
    # returns: keep it alive until they ran
    torch.cuda.synchronize(workspace.device)
    return needed
