"""A decode step in ONNX Runtime with its paged KV cache kept by the session, in place, on the device.

    step = DecodeSession("model.onnx", provider="cuda", num_blocks=4096)
    out = step.run(hidden, positions, slot_mapping, block_tables, context_lens)   # numpy in, numpy out

The exported decode model (tq-deploy export) takes the four cache tensors as inputs and returns
them updated (``k_codes_out`` ...). A DecodeSession allocates them once as OrtValues on the
session's device (GPU memory for "cuda", host memory for "cpu") and binds each as both the input
and its ``*_out`` output with IO binding: TQCacheUpdate then writes the new tokens straight into
them and TQPagedAttention reads them there, so a step moves no cache bytes between host and
device and makes no copy of the cache (:func:`copied_bytes` reads what ONNX Runtime's Memcpy
nodes moved from its profile). Only the step's small inputs (hidden state, positions, slots, block tables,
context lengths) and the output cross the bus.

With ``cuda_graph=True`` (provider "cuda") the step runs as a CUDA graph that ONNX Runtime
captures (its CUDA EP's ``enable_cuda_graph``): one graph per distinct shape of the step inputs
(batch S, block-table width M), each with its own device buffers for those inputs and for ``out``
at fixed addresses, refilled in place every step. The first step of a shape runs the kernels
normally, the second captures and replays them, later ones replay: one launch instead of one per
node. Past MAX_GRAPHS shapes, new shapes run without a graph.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import onnx

from tq_deploy import ops
from tq_deploy.runtime.session import _ORT_DTYPES, bind_in_place, make_session, resident_caches

CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")
STEP_INPUTS = ("hidden", "positions", "slot_mapping", "block_tables", "context_lens")
MAX_GRAPHS = 32  # captured step shapes per session (each holds its own device buffers)


def cache_shapes(config: Mapping, num_blocks: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of each cache tensor of a decode model's config for ``num_blocks`` blocks."""
    b, hkv, d = config["block_size"], config["num_kv_heads"], config["head_dim"]
    return {
        "k_codes": ((num_blocks, b, hkv, ops.packed_size(d, config["k_bits"])), np.uint8),
        "k_norms": ((num_blocks, b, hkv), np.float32),
        "v_codes": ((num_blocks, b, hkv, ops.packed_size(d, config["v_bits"])), np.uint8),
        "v_norms": ((num_blocks, b, hkv), np.float32),
    }


class DecodeSession:
    """The decode step of an exported model with a resident, in-place paged cache (module docstring)."""

    def __init__(self, model: "str | os.PathLike | bytes | onnx.ModelProto | ExportedModel", provider: str = "cpu",
                 num_blocks: int | None = None, library=None, device_id: int = 0, profile: bool = False,
                 profile_prefix: str | None = None, threads: int | None = None, cuda_graph: bool = False):
        import onnxruntime as ort

        from tq_deploy.export.loaded import ExportedModel

        if isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        exported = ExportedModel.of(model)
        kind, config = exported.kind, exported.metadata
        library = library or exported.library
        if kind != "model":
            raise ValueError(f"model kind={kind!r}, expected a decode model exported by `tq-deploy export`")
        self.config = config
        self.num_blocks = int(num_blocks if num_blocks is not None else config["num_blocks"])
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks}, expected >= 1")
        self.provider = provider
        self.cuda_graph = cuda_graph
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.device_id = device_id
        options = ort.SessionOptions()
        if profile:
            options.enable_profiling = True
            if profile_prefix:
                options.profile_file_prefix = profile_prefix
        self.session = make_session(exported.serialized, provider=provider, library=library,
                                    device_id=device_id, session_options=options, threads=threads,
                                    cuda_graph=cuda_graph)
        self._ort = ort
        self._dtypes = {i.name: np.dtype(_ORT_DTYPES[i.type]) for i in self.session.get_inputs()}
        self._out_dtype = np.dtype(_ORT_DTYPES[self.session.get_outputs()[0].type])
        self._graphs: dict[tuple, _GraphStep] = {}
        self._last: _GraphStep | None = None
        # a graph session's runs past MAX_GRAPHS shapes: ORT runs the kernels and captures nothing
        self._eager_options = None
        if cuda_graph:
            self._eager_options = ort.RunOptions()
            self._eager_options.add_run_config_entry("gpu_graph_id", "-1")
        self.caches = resident_caches(cache_shapes(config, self.num_blocks), self.device, device_id)
        self.binding = self.session.io_binding()
        bind_in_place(self.binding, self.caches)
        self.binding.bind_output("out", "cpu")

    def cache_bytes(self) -> int:
        """Bytes of the resident cache (codes and norms of keys and values)."""
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                   for shape, dtype in cache_shapes(self.config, self.num_blocks).values())

    def run(self, hidden, positions, slot_mapping, block_tables, context_lens) -> np.ndarray:
        """One decode step: encodes each sequence's new token into its slot and returns out [S, H]."""
        # The binding may point at these arrays' memory: they must outlive the run, so the
        # contiguous copies made here are held until it returns.
        arrays = [np.ascontiguousarray(v) for v in (hidden, positions, slot_mapping, block_tables, context_lens)]
        for name, array in zip(STEP_INPUTS, arrays):
            if array.dtype != self._dtypes[name]:
                raise ValueError(f"{name}.dtype={array.dtype}, expected {self._dtypes[name]}")
        key = tuple(a.shape for a in arrays)
        if self.cuda_graph and (key in self._graphs or len(self._graphs) < MAX_GRAPHS):
            return self._run_graph(key, arrays)
        for name, array in zip(STEP_INPUTS, arrays):
            self.binding.bind_cpu_input(name, array)
        # "out" is bound on the host: ORT copies that one output back, never the bound caches
        self.binding.bind_output("out", "cpu")
        self.session.run_with_iobinding(self.binding, self._eager_options)
        del arrays
        return self.binding.get_outputs()[-1].numpy()

    def _run_graph(self, key: tuple, arrays: list[np.ndarray]) -> np.ndarray:
        step = self._graphs.get(key)
        if step is None:
            step = self._graphs[key] = _GraphStep(self, arrays, graph_id=len(self._graphs))
        else:
            for value, array in zip(step.inputs, arrays):
                value.update_inplace(array)
        self._last = step
        self.session.run_with_iobinding(step.binding, step.run_options)
        return step.out.numpy()

    def replay(self) -> None:
        """(cuda_graph) The last step's graph again, on the step inputs its device buffers hold and
        with ``out`` left on the device: the step alone, without the host copies around it
        (benchmarks; the cache advances as in any step)."""
        if self._last is None:
            raise ValueError("replay() needs a session made with cuda_graph=True that has run a step")
        self.session.run_with_iobinding(self._last.binding, self._last.run_options)

    def load_cache(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the cache contents with host arrays (a copy to the device; tests and warm starts).
        Every array is checked before any is written."""
        shapes = cache_shapes(self.config, self.num_blocks)
        missing = [n for n in CACHE_NAMES if n not in arrays]
        if missing:
            raise ValueError(f"arrays has {sorted(arrays)}, expected all of {list(CACHE_NAMES)} (missing {missing})")
        checked = {}
        for name in CACHE_NAMES:
            expected, dtype = shapes[name]
            array = np.ascontiguousarray(arrays[name], dtype=dtype)
            if array.shape != expected:
                raise ValueError(f"{name}.shape={array.shape}, expected {expected}")
            checked[name] = array
        for name, array in checked.items():
            self.caches[name].update_inplace(array)

    def read_cache(self) -> dict[str, np.ndarray]:
        """The cache contents as host arrays (a copy)."""
        return {name: value.numpy() for name, value in self.caches.items()}

    def end_profiling(self) -> str:
        return self.session.end_profiling()


class _GraphStep:
    """The bound buffers and run options of one captured step shape: device copies of the step
    inputs and a device ``out``, bound with the session's resident caches."""

    def __init__(self, owner: DecodeSession, arrays: list[np.ndarray], graph_id: int):
        ort, device, device_id = owner._ort, owner.device, owner.device_id
        self.inputs = [ort.OrtValue.ortvalue_from_numpy(a, device, device_id) for a in arrays]
        shape = [arrays[0].shape[0], int(owner.config["hidden_size"])]
        self.out = ort.OrtValue.ortvalue_from_shape_and_type(shape, owner._out_dtype.type, device, device_id)
        self.binding = owner.session.io_binding()
        bind_in_place(self.binding, owner.caches)
        for name, value in zip(STEP_INPUTS, self.inputs):
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("out", self.out)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))


def copied_bytes(profile_path: str | os.PathLike) -> dict:
    """Bytes that ONNX Runtime's Memcpy nodes moved, by direction, from a session's profile JSON
    (the nodes ORT inserts where a value crosses between host and device)."""
    with open(profile_path) as f:
        events = json.load(f)
    moved = {"to_device": 0, "to_host": 0, "nodes": 0}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "")
        if op not in ("MemcpyFromHost", "MemcpyToHost"):
            continue
        size = int(e["args"].get("output_size", 0))
        moved["to_device" if op == "MemcpyFromHost" else "to_host"] += size
        moved["nodes"] += 1
    return moved
