"""ONNX Runtime sessions with the TurboQuant custom-op library, on the CPU or the CUDA EP.

    session = make_session("model.onnx")                 # CPU EP, library from locate("ort")
    session = make_session("model.onnx", provider="cuda")  # CUDA EP (onnxruntime-gpu), CPU EP for the rest
    outputs = run(session, inputs)                       # dict name -> numpy array

The custom-op library (plugins/ort) registers the "turboquant" domain with
ONNX Runtime (CPU kernels always, CUDA kernels when it was built with nvcc);
without it a session cannot even be created for our models.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tq_deploy.runtime import library as native


def custom_op_library(library: str | os.PathLike | None = None) -> Path:
    """Path of the custom-op library: ``library`` if given, else ``locate("ort")``."""
    if library is None:
        return Path(native.locate("ort"))
    from tq_deploy import files

    path = Path(library)
    kind = files.kind_of(path)
    if kind is None:
        raise native.NativeLibraryNotFoundError(
            f"library={str(path)!r} does not exist, expected the path of {native.LIBRARIES['ort'].filename}. "
            + native.build_help("ort"))
    if kind != "file":
        raise ValueError(f"library={str(path)!r} is a {kind}, expected the path of {native.LIBRARIES['ort'].filename}")
    return path


def register_library(options, library: str | os.PathLike | None = None) -> Path:
    """Registers the custom-op library in ``options``; one that is not it is a ValueError naming it."""
    path = custom_op_library(library)
    try:
        options.register_custom_ops_library(str(path))
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for a bad library
        raise ValueError(
            f"library={str(path)!r} does not load as the TurboQuant custom-op library ({' '.join(str(err).split())}); "
            f"expected {native.LIBRARIES['ort'].filename} built for this onnxruntime"
        ) from None
    return path


def check_library(library: str | os.PathLike | None = None) -> Path:
    """Fails early (before child processes or a long run) when ``library`` does not load."""
    import onnxruntime as ort

    return register_library(ort.SessionOptions(), library)


PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}

# ONNX Runtime's log severity for sessions made here when the caller's options leave it unset
# (None: ORT's default, warnings and errors). The CLI sets 4 (fatal only) unless --debug: every ORT
# error also comes back as the exception the CLI prints as its one error line.
LOG_SEVERITY: int | None = None


def check_custom_nodes(model) -> None:
    """The model's ``turboquant`` opset version and every custom node's attributes against the op
    contract (tq_deploy.ops): a ValueError naming the node, the attribute or version seen and what
    is expected. ONNX Runtime's custom-op API shows a kernel neither the model's opset version of its
    domain nor the list of a node's attributes, so the library alone cannot refuse an unknown
    attribute or an opset it does not implement; this check does, for every session made here."""
    import onnx

    from tq_deploy import ops

    for opset in model.opset_import:
        if opset.domain == ops.DOMAIN and opset.version != ops.DOMAIN_VERSION:
            raise ValueError(f"model imports opset {ops.DOMAIN!r} version {opset.version}, expected version "
                             f"{ops.DOMAIN_VERSION} (the only one this tq_deploy implements)")
    kinds = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT}
    for node in model.graph.node:
        if node.domain != ops.DOMAIN:
            continue
        where = f"node {node.name or node.op_type!r}"
        spec = ops.OPS_BY_NAME.get(node.op_type)
        if spec is None:
            raise ValueError(f"{where}: op {ops.DOMAIN}::{node.op_type} does not exist, expected one of "
                             f"{sorted(ops.OPS_BY_NAME)}")
        names = {a.name for a in spec.attributes}
        given = {}
        for attr in node.attribute:
            if attr.name not in names:
                raise ValueError(f"{where} ({spec.name}): attribute {attr.name!r} is unknown, expected a subset of "
                                 f"{sorted(names)}")
            kind = spec.attribute(attr.name).kind
            if attr.type != kinds[kind]:
                seen = onnx.AttributeProto.AttributeType.Name(attr.type)
                raise ValueError(f"{where} ({spec.name}): attribute {attr.name} has type {seen}, expected "
                                 f"{kind.upper()} (docs/ops.md)")
            given[attr.name] = onnx.helper.get_attribute_value(attr)
        try:
            spec.resolve_attributes(**given)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def library_build_info(library: str | os.PathLike | None = None) -> dict:
    """What the custom-op library was built with: {"providers": [...], "cuda_architectures": "..."}."""
    import ctypes
    import json

    lib = ctypes.CDLL(str(custom_op_library(library)))
    fn = lib.TQDeployOrtBuildInfo
    fn.restype = ctypes.c_char_p
    return json.loads(fn().decode())


def cuda_unavailable_reason(library: str | os.PathLike | None = None) -> str:
    """Why an ORT session on the CUDA EP cannot run the TurboQuant ops here ("" when it can)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        return f"onnxruntime does not import ({err})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu: "
                "pip install 'tq-deploy[gpu]')")
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
    except ImportError:
        pass
    try:
        info = library_build_info(library)
    except (OSError, AttributeError, native.NativeLibraryNotFoundError) as err:
        return f"the custom-op library does not say its build ({err})"
    if "cuda" not in info.get("providers", []):
        return "the custom-op library was built without CUDA kernels (no nvcc at build time)"
    return ""


def make_session(model: str | os.PathLike | bytes, provider: str = "cpu", library: str | os.PathLike | None = None,
                 *, providers: Sequence | None = None, device_id: int = 0, session_options=None,
                 threads: int | None = None, cuda_graph: bool = False):
    """An ``onnxruntime.InferenceSession`` with the TurboQuant custom ops registered.

    ``model`` is a path or serialized model bytes. ``provider`` "cpu" or "cuda" (the CUDA EP on
    ``device_id`` with TF32 off, the CPU EP for nodes it does not take); ``providers`` overrides it with an
    explicit ONNX Runtime list. Asking for one this onnxruntime build lacks is a ValueError naming
    what it has. ``cuda_graph`` turns on the CUDA EP's graph capture (``enable_cuda_graph``): every
    run must then go through IO binding with device buffers at fixed addresses (DecodeSession does).
    """
    import onnxruntime as ort

    if cuda_graph and (providers is not None or provider != "cuda"):
        raise ValueError(f"cuda_graph=True with provider={provider!r}, expected provider='cuda' (and no providers list)")
    if providers is None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider={provider!r}, expected one of {tuple(PROVIDERS)}")
        providers = PROVIDERS[provider]
    names = [p if isinstance(p, str) else p[0] for p in providers]
    available = ort.get_available_providers()
    missing = [p for p in names if p not in available]
    if missing:
        hint = " (install onnxruntime-gpu: pip install 'tq-deploy[gpu]')" if "CUDAExecutionProvider" in missing else ""
        raise ValueError(f"providers={names} includes {missing}, expected a subset of {available}{hint}")
    # IEEE fp32 in the CUDA EP's own MatMul nodes (use_tf32=0): with TF32 the projections round
    # to 10-bit mantissas, keys move by ~1e-4 and the session no longer matches the CPU EP and the
    # reference it is validated against; an explicit `providers` list keeps its own options
    cuda_options = {"device_id": device_id, "use_tf32": 0, **({"enable_cuda_graph": 1} if cuda_graph else {})}
    listed = [("CUDAExecutionProvider", cuda_options) if p == "CUDAExecutionProvider" else p for p in providers]
    options = session_options or ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}, expected >= 1")
        options.intra_op_num_threads = threads
    if LOG_SEVERITY is not None and options.log_severity_level < 0:
        options.log_severity_level = LOG_SEVERITY
    register_library(options, library)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    check_custom_nodes(_proto(model))
    return ort.InferenceSession(model, sess_options=options, providers=listed)


def _proto(model: str | bytes):
    """The ModelProto of a path or serialized bytes (external data left on disk: only the graph is read)."""
    import onnx

    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(model, load_external_data=False)


def to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like as a contiguous numpy array (dtype kept)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


# ONNX Runtime's input type strings and the numpy dtypes they take.
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
               "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def feeds_for(session, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Numpy feeds for exactly the session's inputs; a missing or extra name, a wrong dtype, rank or
    fixed size is a ValueError naming the input (ORT's own message names neither for a dtype)."""
    specs = session.get_inputs()
    names = [i.name for i in specs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise ValueError(f"inputs have names {sorted(inputs)}, expected {names} (missing {missing}, extra {extra})")
    feeds = {n: to_numpy(inputs[n]) for n in names}
    for spec in specs:
        array = feeds[spec.name]
        want = _ORT_DTYPES.get(spec.type)
        if want is not None and array.dtype != want:
            raise ValueError(f"input {spec.name!r} has dtype {array.dtype}, expected {np.dtype(want)} ({spec.type})")
        shape = spec.shape  # [] for a scalar and for an input of unknown shape alike: not checked then
        if shape and (array.ndim != len(shape) or any(
                isinstance(d, int) and d >= 0 and d != s for d, s in zip(shape, array.shape))):
            shown = "[" + ", ".join(str(d) for d in shape) + "]"
            raise ValueError(f"input {spec.name!r} has shape {list(array.shape)}, expected {shown}")
    return feeds


def run(session, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Run once; returns every output by name."""
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds_for(session, inputs))
    return dict(zip(names, values))


@dataclass
class Timing:
    repeat: int
    mean_ms: float
    min_ms: float
    max_ms: float

    def __str__(self) -> str:
        return f"{self.repeat} runs: mean {self.mean_ms:.3f} ms, min {self.min_ms:.3f} ms, max {self.max_ms:.3f} ms"


def time_runs(session, inputs: Mapping[str, object], repeat: int = 10, warmup: int = 1) -> tuple[dict, Timing]:
    """Outputs of the last run and the wall time of ``repeat`` runs after ``warmup``."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat}, expected >= 1")
    feeds = feeds_for(session, inputs)
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feeds)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        values = session.run(names, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    timing = Timing(repeat, float(np.mean(times)), float(np.min(times)), float(np.max(times)))
    return dict(zip(names, values)), timing


def cache_output_name(name: str) -> str:
    """The output that returns cache input ``name`` updated: ``k_codes`` -> ``k_codes_out``, and for a
    layer's cache ``k_codes.3`` -> ``k_codes_out.3``."""
    base, dot, layer = name.partition(".")
    return f"{base}_out{dot}{layer}"


def resident_caches(shapes: Mapping[str, tuple], device: str = "cpu", device_id: int = 0) -> dict:
    """Zero-filled OrtValues on ``device`` ("cpu" or "cuda") for ``{name: (shape, dtype)}``: the caches a
    session keeps between runs (zero codes and norms decode to zero vectors)."""
    import onnxruntime as ort

    return {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, device_id)
            for name, (shape, dtype) in shapes.items()}


def bind_in_place(binding, caches: Mapping[str, object]) -> None:
    """Bind every cache OrtValue as its input and as the output that returns it updated
    (:func:`cache_output_name`): TQCacheUpdate then writes the new tokens into the resident buffer,
    and no cache byte is copied by a run."""
    for name, value in caches.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(cache_output_name(name), value)


def cache_aliases(session) -> dict[str, str]:
    """Output name -> input name for outputs that are an updated input (``k_codes_out`` <- ``k_codes``)."""
    inputs = {i.name for i in session.get_inputs()}
    return {o.name: o.name[: -len("_out")] for o in session.get_outputs()
            if o.name.endswith("_out") and o.name[: -len("_out")] in inputs}


def run_in_place(session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with IO binding, writing each updated cache into its input's own buffer.

    ``inputs`` must be numpy arrays (C-contiguous); the cache arrays among them
    (k_codes, k_norms, v_codes, v_norms) are updated in place, as a server keeps its
    KV cache: ``TQCacheUpdate`` declares its outputs may reuse those inputs, and the
    custom-op library skips the copy when they are the same buffer. CPU provider only.
    """
    import onnxruntime as ort

    feeds = feeds_for(session, inputs)
    for name, array in feeds.items():
        if array is not inputs[name]:
            raise ValueError(f"inputs[{name!r}] is a {type(inputs[name]).__name__} (or not C-contiguous), "
                             "expected a C-contiguous numpy array it can update in place")
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    aliases = cache_aliases(session)
    for out in session.get_outputs():
        if out.name in aliases:
            binding.bind_ortvalue_output(out.name, values[aliases[out.name]])
        else:
            binding.bind_output(out.name, "cpu")
    session.run_with_iobinding(binding)
    results = binding.copy_outputs_to_cpu()
    return {o.name: (feeds[aliases[o.name]] if o.name in aliases else r)
            for o, r in zip(session.get_outputs(), results)}
