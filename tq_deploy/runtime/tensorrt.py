"""TensorRT engines with the TurboQuant plugins (plugins/trt -> tq_deploy/lib/libtq_deploy_trt.so):
build and run. (Driving one plugin's enqueue without TensorRT, for the GPU tests and the plugin
benchmark, is :mod:`tq_deploy.runtime.trt_harness`.)

    build = build_engine("model.onnx", "model.engine")   # parse, map "turboquant" nodes, serialize
    stage = tensorrt_stage(model_proto, "out/")          # the same as a pipeline stage -> dict

Backends (same Python API, chosen by ``backend=`` or env TQ_DEPLOY_TRT_BACKEND):
    "rtx"       TensorRT-RTX 1.7 (pip tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings, module
                tensorrt_rtx_bindings). Builds engines on a machine without a GPU. Its runtime
                needs a GPU and refuses compute capability 9.0 (H100/H200).
    "tensorrt"  full TensorRT 10/11 (``import tensorrt``). Written to the same API but never run
                here: its pip wheels cannot be installed on these machines.
    "auto"      full TensorRT when importable, else TensorRT-RTX.

How the "turboquant" nodes become plugins: the ONNX parser imports a node of an unknown domain
as an IPluginV3 plugin looked up by (op name, version "1", namespace = node domain), so the
plugin library is loaded into the plugin registry (``load_library``: it calls the exported
``getCreators``) before parsing. Three things this module works around:

* TensorRT refuses uint8 plugin inputs/outputs ("UInt8 datatype formats are not supported"), so
  packed codes cross the TensorRT boundary as int8 with the same bytes:
  :func:`retype_codes_for_tensorrt` rewrites every uint8 tensor of the graph to int8 before
  parsing, and engine I/O of codes is int8 (view uint8 buffers as int8).
* TensorRT-RTX's ONNX parser dlopens ``libtensorrt_rtx.so`` but the wheel ships only ``.so.1``:
  :func:`ensure_rtx_parser_link` creates the symlink next to it.
* TensorRT-RTX's Python network has no ``add_plugin_v3``: plugins enter through the parser only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import onnx

from tq_deploy import files, ops
from tq_deploy.runtime import library as native

ENV_BACKEND = "TQ_DEPLOY_TRT_BACKEND"
BACKENDS = ("auto", "rtx", "tensorrt")
PLUGIN_NAMESPACE = ops.DOMAIN
PLUGIN_VERSION = "1"
# Ops of the contract whose plugin is not built yet, with the reason: an engine cannot hold them
# (none: every op's plugin is expanded from the generated op list).
PLUGINS_PENDING: dict[str, str] = {}
PLUGIN_NAMES = tuple(op.name for op in ops.ALL_OPS if op.name not in PLUGINS_PENDING)

# Optimization-profile ranges (min, opt, max) of the dynamic dims tq-deploy's exporters name.
DEFAULT_DIM_RANGES: dict[str, tuple[int, int, int]] = {
    "batch": (1, 4, 32),
    "num_tokens": (1, 4, 64),
    "num_blocks": (1, 64, 1024),
    "max_blocks": (1, 8, 64),
    "n": (1, 64, 4096),
    "logit_rows": (1, 4, 64),  # an exported LLM's rows whose logits are returned
}

RUNTIME_NOTE = (
    "engine deserialization and execution need a GPU; TensorRT-RTX 1.7 runs only on compute "
    "capabilities it supports (it refuses 9.0, i.e. H100/H200), full TensorRT 10/11 runs anywhere"
)

class TensorRTUnavailableError(ImportError):
    """Neither TensorRT-RTX nor full TensorRT can be imported."""


def plugin_library_path() -> str:
    """Absolute path of libtq_deploy_trt.so (``tq_deploy.runtime.library.locate("trt")``)."""
    return native.locate("trt")


# ---------------------------------------------------------------- TensorRT modules

def ensure_rtx_parser_link() -> Path | None:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` in the tensorrt_rtx_libs package.

    The RTX ONNX parser dlopens the unversioned name (found through its $ORIGIN rpath); without
    the link the process aborts when the parser is created. Returns the link, or None when the
    wheel is not installed. Must run before the first OnnxParser of the process.
    """
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    target = folder / "libtensorrt_rtx.so.1"
    link = folder / "libtensorrt_rtx.so"
    if not target.exists() or link.exists():
        return link if link.exists() else None
    try:
        link.symlink_to(target.name)
    except FileExistsError:
        pass
    except OSError as err:
        raise TensorRTUnavailableError(
            f"cannot create {link} -> {target.name} ({err}); TensorRT-RTX's ONNX parser dlopens libtensorrt_rtx.so. "
            f"Create that link yourself, or a folder holding it and put the folder on LD_LIBRARY_PATH before "
            "starting Python."
        ) from None
    return link


def import_tensorrt(backend: str | None = None):
    """The TensorRT Python module of ``backend`` ("auto", "rtx", "tensorrt"; env TQ_DEPLOY_TRT_BACKEND)."""
    backend = backend or os.environ.get(ENV_BACKEND, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}, expected one of {BACKENDS}")
    errors = []
    if backend in ("auto", "tensorrt"):
        try:
            module = importlib.import_module("tensorrt")
            module.Builder  # the pip stub packages import but have no API
            return module
        except Exception as err:  # noqa: BLE001 - any failure means "not usable"
            errors.append(f"tensorrt: {err}")
    if backend in ("auto", "rtx"):
        try:
            ensure_rtx_parser_link()
            return importlib.import_module("tensorrt_rtx_bindings")
        except Exception as err:  # noqa: BLE001
            errors.append(f"tensorrt_rtx_bindings: {err}")
    raise TensorRTUnavailableError(
        f"no TensorRT for backend={backend!r} ({'; '.join(errors)}). Install TensorRT-RTX with "
        "`pip install tq-deploy[rtx]` (tensorrt-rtx-cu13-libs/-bindings 1.7.1.116) or full TensorRT."
    )


def backend_name(trt) -> str:
    return "rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


_LOADED: dict[tuple[str, str], object] = {}


def load_plugins(trt, library: str | os.PathLike | None = None) -> list[str]:
    """Load the plugin library into ``trt``'s plugin registry (once per process); returns the
    "turboquant" plugin names the registry then holds. Raises RuntimeError if any op is missing."""
    path = str(Path(library).resolve()) if library is not None else plugin_library_path()
    registry = trt.get_plugin_registry()
    key = (trt.__name__, path)
    if key not in _LOADED:
        handle = registry.load_library(path)
        if handle is None:
            raise RuntimeError(f"{trt.__name__}: get_plugin_registry().load_library({path!r}) failed")
        _LOADED[key] = handle
    found = sorted(c.name for c in registry.all_creators if c.plugin_namespace == PLUGIN_NAMESPACE)
    missing = [n for n in PLUGIN_NAMES if n not in found]
    if missing:
        raise RuntimeError(f"plugin library {path} registered {found} in namespace {PLUGIN_NAMESPACE!r}, "
                           f"expected also {missing}")
    return found


# ---------------------------------------------------------------- ONNX preparation and profiles

def retype_codes_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose uint8 tensors (packed codes) are int8: same bytes, a type that
    TensorRT accepts at plugin inputs/outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        t = vi.type.tensor_type
        if t.elem_type == onnx.TensorProto.UINT8:
            t.elem_type = onnx.TensorProto.INT8
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.UINT8:
            raise ValueError(f"initializer {init.name!r} is uint8, expected no uint8 initializers "
                             "(only graph inputs/outputs carry codes)")
    return out


def _dims_of(value_info) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def profile_shapes(model: onnx.ModelProto, dims: Mapping[str, Sequence[int]] | None = None,
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every graph input with a dynamic dim.

    A dynamic dim named ``d`` takes ``dims[d]`` (a (min, opt, max) triple), else
    ``DEFAULT_DIM_RANGES[d]``; a dim with no range is a ValueError naming it.
    """
    ranges = dict(DEFAULT_DIM_RANGES)
    for name, triple in (dims or {}).items():
        triple = tuple(int(v) for v in triple)
        if len(triple) != 3 or not (1 <= triple[0] <= triple[1] <= triple[2]):
            raise ValueError(f"dims[{name!r}]={triple}, expected (min, opt, max) with 1 <= min <= opt <= max")
        ranges[name] = triple
    initializers = {i.name for i in model.graph.initializer}
    dynamic = {d for vi in model.graph.input if vi.name not in initializers for d in _dims_of(vi) if isinstance(d, str)}
    for name in dims or {}:
        if name not in dynamic:  # a typo would otherwise be ignored and the default range used
            raise ValueError(f"dim {name!r} names no dynamic dim of the model's inputs, expected one of "
                             f"{sorted(dynamic)}")
    shapes = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        shape = _dims_of(vi)
        if all(isinstance(d, int) and d > 0 for d in shape):
            continue
        triple = []
        for k in range(3):
            row = []
            for axis, d in enumerate(shape):
                if isinstance(d, int) and d > 0:
                    row.append(d)
                elif isinstance(d, str) and d in ranges:
                    row.append(ranges[d][k])
                elif isinstance(d, str) and d.endswith("+1") and d[:-2] in ranges:
                    row.append(ranges[d[:-2]][k] + 1)  # query_start [S+1] follows its S
                else:
                    raise ValueError(f"input {vi.name!r} axis {axis} is dynamic ({d!r}) with no profile range; "
                                     f"pass dims={{{d!r}: (min, opt, max)}} (known: {sorted(ranges)})")
            triple.append(tuple(row))
        shapes[vi.name] = tuple(triple)
    return shapes


# ---------------------------------------------------------------- engine build

@dataclass
class EngineBuild:
    engine_path: str | None
    engine_bytes: int
    build_seconds: float
    backend: str
    tensorrt_version: str
    plugins: list[str]
    inputs: dict = field(default_factory=dict)   # name -> [dtype, shape] as parsed (-1 = dynamic)
    outputs: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)  # name -> [min, opt, max]
    aliased_plugin_io: bool = False
    runtime_note: str = RUNTIME_NOTE

    def to_dict(self) -> dict:
        return asdict(self)


def make_logger(trt, level: str = "error"):
    """A TensorRT logger that keeps every message (for error reports) and prints those at
    ``level`` ("internal_error", "error", "warning", "info", "verbose") or more severe."""
    order = ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"]
    if level.upper() not in order:
        raise ValueError(f"log_level={level!r}, expected one of {[o.lower() for o in order]}")
    limit = order.index(level.upper())

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            name = str(severity).split(".")[-1]
            self.messages.append((name, msg))
            if name in order and order.index(name) <= limit:
                print(f"[{trt.__name__}] {name}: {msg}", file=sys.stderr)

    return Logger()


def _errors(logger) -> str:
    bad = [m for s, m in logger.messages if "ERROR" in s or "INTERNAL" in s]
    return " | ".join(bad[-5:]) or "(no error message)"


def parse_network(trt, builder, logger, model: onnx.ModelProto):
    """A network parsed from ``model`` (already retyped); parser errors raise RuntimeError."""
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        problems = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise RuntimeError(f"{trt.__name__} ONNX parser failed: {problems}")
    return network, parser


def build_engine(onnx_path: str | os.PathLike | onnx.ModelProto, engine_path: str | os.PathLike | None = None, *,
                 dims: Mapping[str, Sequence[int]] | None = None,
                 profile: Mapping[str, Sequence[Sequence[int]]] | None = None,
                 backend: str | None = None, library: str | os.PathLike | None = None,
                 aliased_plugin_io: bool = True, log_level: str = "error") -> EngineBuild:
    """Parse ``onnx_path`` with the TurboQuant plugins and serialize an engine to ``engine_path``.

    The optimization profile is ``profile`` (input name -> (min, opt, max) shapes) or one made by
    :func:`profile_shapes` from the inputs' dim names and ``dims``. ``aliased_plugin_io`` turns on
    the preview feature that lets TQCacheUpdate write its caches in place (else the plugin copies).
    """
    from tq_deploy.export.common import check_wiring, load_model

    from tq_deploy.runtime.session import check_custom_nodes

    model = onnx_path if isinstance(onnx_path, onnx.ModelProto) else load_model(onnx_path)
    check_custom_nodes(model)  # the plugin creators cannot see the model's opset version
    check_wiring(model, "model" if isinstance(onnx_path, onnx.ModelProto) else f"model {os.fspath(onnx_path)!r}")
    shapes = {k: tuple(tuple(int(v) for v in s) for s in triple) for k, triple in (profile or {}).items()}
    if profile is None:
        shapes = profile_shapes(model, dims)  # before TensorRT loads: a bad --dim is an error even without it
    trt = import_tensorrt(backend)
    plugins = load_plugins(trt, library)
    logger = make_logger(trt, log_level)
    builder = trt.Builder(logger)
    network, _parser = parse_network(trt, builder, logger, retype_codes_for_tensorrt(model))
    config = builder.create_builder_config()
    if shapes:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    if aliased_plugin_io and hasattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03"):
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    else:
        aliased_plugin_io = False
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"{trt.__name__}: build_serialized_network failed: {_errors(logger)}")
    data = bytes(serialized)
    if engine_path is not None:
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes(engine_path, data)

    def describe(tensor) -> list:
        return [str(tensor.dtype).split(".")[-1].lower(), list(tensor.shape)]

    return EngineBuild(
        engine_path=os.fspath(engine_path) if engine_path is not None else None,
        engine_bytes=len(data), build_seconds=round(seconds, 3), backend=backend_name(trt),
        tensorrt_version=trt.__version__, plugins=plugins,
        inputs={network.get_input(i).name: describe(network.get_input(i)) for i in range(network.num_inputs)},
        outputs={network.get_output(i).name: describe(network.get_output(i)) for i in range(network.num_outputs)},
        profile={k: [list(s) for s in v] for k, v in shapes.items()}, aliased_plugin_io=aliased_plugin_io,
    )


def tensorrt_stage(model: str | os.PathLike | onnx.ModelProto, out_dir: str | os.PathLike, *, name: str | None = None,
                   **build_kwargs) -> dict:
    """The pipeline's TensorRT stage: build ``out_dir/<name>.engine`` (name: the model file's stem, or
    "model"); never raises for a missing TensorRT or plugin library (status "skipped" with the
    reason), does raise for a model TensorRT rejects (status would be meaningless). ``model`` may be
    a :class:`tq_deploy.export.loaded.ExportedModel` (its proto, its file's stem)."""
    if hasattr(model, "proto"):  # an ExportedModel: built from its proto, named after its file
        name, model = name or model.name, model.proto
    if name is None:
        name = "model" if isinstance(model, onnx.ModelProto) else Path(model).stem
    source = "(in memory)" if isinstance(model, onnx.ModelProto) else os.fspath(model)
    engine_path = Path(out_dir) / f"{name}.engine"
    try:
        build = build_engine(model, engine_path, **build_kwargs)
    except (TensorRTUnavailableError, native.NativeLibraryNotFoundError) as err:
        return {"stage": "tensorrt", "status": "skipped", "reason": str(err), "onnx": source}
    return {"stage": "tensorrt", "status": "built", "onnx": source, **build.to_dict()}


def network_from_onnx(onnx_path: str | os.PathLike | onnx.ModelProto, trt=None):
    """(builder, network, parser) for a model with the TurboQuant plugins loaded; codes tensors
    retyped uint8 -> int8 (see the module docstring)."""
    trt = trt or import_tensorrt()
    load_plugins(trt)
    logger = make_logger(trt, "error")
    builder = trt.Builder(logger)
    if not isinstance(onnx_path, onnx.ModelProto):
        from tq_deploy.export.common import check_wiring, load_model

        onnx_path = load_model(onnx_path)
    network, parser = parse_network(trt, builder, logger, retype_codes_for_tensorrt(onnx_path))
    return builder, network, parser


def polygraphy_tensorrt():
    """The TensorRT module polygraphy uses (tensorrt_rtx with POLYGRAPHY_USE_TENSORRT_RTX=1)."""
    from polygraphy import config

    if config.USE_TENSORRT_RTX:
        ensure_rtx_parser_link()
        import tensorrt_rtx as trt  # the wrapper polygraphy imports; same classes as tensorrt_rtx_bindings
    else:
        import tensorrt as trt
    return trt


def tensorrt_usable() -> tuple[bool, str]:
    """Whether an engine can run here, and why not."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device: TensorRT engines build here but cannot run"
        trt = import_tensorrt()
        load_plugins(trt)
        if backend_name(trt) == "rtx" and torch.cuda.get_device_capability() == (9, 0):
            return False, "TensorRT-RTX refuses compute capability 9.0 (H100/H200); full TensorRT is needed"
        return True, f"{trt.__name__} {trt.__version__}"
    except Exception as err:  # noqa: BLE001 - any failure means not usable, with the reason
        return False, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------- running an engine (GPU)

def run_engine(engine_path: str | os.PathLike, inputs: Mapping[str, object], *, backend: str | None = None,
               library: str | os.PathLike | None = None) -> dict:
    """Run a built engine once on the GPU with torch CUDA tensors; returns outputs by name (torch).

    Needs a GPU the TensorRT flavour accepts (TensorRT-RTX refuses compute capability 9.0, so
    H100/H200 need full TensorRT). uint8 inputs (codes) are passed as int8 views (same bytes).
    """
    import torch

    trt = import_tensorrt(backend)
    load_plugins(trt, library)
    logger = make_logger(trt, "error")
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"deserialize_cuda_engine({engine_path}) failed: {_errors(logger)}")
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    keep, outputs = [], {}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = torch.as_tensor(inputs[name]).cuda().contiguous()
            t = t.view(torch.int8) if t.dtype == torch.uint8 else t
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
                     trt.int32: torch.int32, trt.int64: torch.int64}[engine.get_tensor_dtype(name)]
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"execute_async_v3 failed: {_errors(logger)}")
    stream.synchronize()
    return {k: (v.view(torch.uint8) if v.dtype == torch.int8 else v) for k, v in outputs.items()}
