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
    path = Path(library)
    if not path.is_file():
        raise native.NativeLibraryNotFoundError(
            f"library={str(path)!r} does not exist, expected the path of {native.LIBRARIES['ort'].filename}. "
            + native.build_help("ort"))
    return path


PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


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
                 threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` with the TurboQuant custom ops registered.

    ``model`` is a path or serialized model bytes. ``provider`` "cpu" or "cuda" (the CUDA EP on
    ``device_id``, the CPU EP for nodes it does not take); ``providers`` overrides it with an
    explicit ONNX Runtime list. Asking for one this onnxruntime build lacks is a ValueError naming
    what it has.
    """
    import onnxruntime as ort

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
    listed = [("CUDAExecutionProvider", {"device_id": device_id}) if p == "CUDAExecutionProvider" else p
              for p in providers]
    options = session_options or ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}, expected >= 1")
        options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(custom_op_library(library)))
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=options, providers=listed)


def to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like as a contiguous numpy array (dtype kept)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def feeds_for(session, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Numpy feeds for exactly the session's inputs; a missing or extra name is a ValueError."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise ValueError(f"inputs have names {sorted(inputs)}, expected {names} (missing {missing}, extra {extra})")
    return {n: to_numpy(inputs[n]) for n in names}


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
