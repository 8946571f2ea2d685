"""polygraphy runs of models with TurboQuant ops: ONNX Runtime, the PyTorch reference, TensorRT.

1. TensorRT through the polygraphy CLI (a network script: ``--plugins`` only ctypes-loads a file,
   it does not register a V3 plugin library, and RTX's network has no add_plugin_v3)::

       POLYGRAPHY_USE_TENSORRT_RTX=1 TQ_ONNX_MODEL=model.onnx \\
         polygraphy run tq_deploy/validate/polygraphy_run.py:load_network \\
           --model-type trt-network-script --trt --save-engine model.engine \\
           --trt-min-shapes query:[1,8,64] ... --trt-opt-shapes ... --trt-max-shapes ...

   (``POLYGRAPHY_USE_TENSORRT_RTX=1`` needs the wrapper package tensorrt-rtx-cu13==1.7.1.116;
   without it polygraphy imports full TensorRT.) On a machine without a usable GPU, add
   ``--no-infer`` ... polygraphy 0.53 has no such flag for ``run``: use ``polygraphy convert``
   with the same script and ``-o model.engine`` to only build.

2. Python, :func:`compare_with_polygraphy`: polygraphy's Comparator over
       * ``OnnxrtRunner`` with a session made by tq_deploy.runtime.session.make_session
         (polygraphy's own SessionFromOnnx cannot register a custom-op library),
       * :class:`ReferenceRunner`, a polygraphy BaseRunner that runs tq_deploy.reference,
       * ``TrtRunner`` on an engine built with the TurboQuant plugins, only when a GPU that the
         TensorRT backend can run on is present (TensorRT-RTX refuses compute capability 9.0).
   Outputs are compared with tq_deploy.validate.compare (packed codes compared per code).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx

ENV_MODEL = "TQ_ONNX_MODEL"


# ---------------------------------------------------------------- network script (CLI)

def _polygraphy_trt():
    """The TensorRT module polygraphy uses (tensorrt_rtx with POLYGRAPHY_USE_TENSORRT_RTX=1)."""
    from polygraphy import config

    from tq_deploy.runtime import tensorrt as rt

    if config.USE_TENSORRT_RTX:
        rt.ensure_rtx_parser_link()
        import tensorrt_rtx as trt  # the wrapper polygraphy imports; same classes as tensorrt_rtx_bindings
    else:
        import tensorrt as trt
    return trt


def network_from_onnx(onnx_path: str | os.PathLike, trt=None):
    """(builder, network, parser) for ``onnx_path`` with the TurboQuant plugins loaded; codes
    tensors retyped uint8 -> int8 (see tq_deploy.runtime.tensorrt)."""
    from tq_deploy.runtime import tensorrt as rt

    trt = trt or _polygraphy_trt()
    rt.load_plugins(trt)
    logger = rt.make_logger(trt, "error")
    builder = trt.Builder(logger)
    model = rt.retype_codes_for_tensorrt(onnx.load(os.fspath(onnx_path)))
    network, parser = rt.parse_network(trt, builder, logger, model)
    return builder, network, parser


def load_network():
    """polygraphy ``trt-network-script`` entry point: the model named by env TQ_ONNX_MODEL."""
    path = os.environ.get(ENV_MODEL)
    if not path or not Path(path).is_file():
        raise ValueError(f"{ENV_MODEL}={path!r}, expected the path of an .onnx model with turboquant ops")
    return network_from_onnx(path)


# ---------------------------------------------------------------- runners

def _base_runner():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


class ReferenceRunner(_base_runner()):
    """A polygraphy runner whose 'inference' is tq_deploy.reference on the model's stored config
    (tq_deploy.validate.reference.reference_outputs): the oracle every backend is compared with."""

    def __init__(self, model_path: str | os.PathLike, name: str | None = None):
        super().__init__(name=name, prefix="tq-reference-runner")
        self.model_path = os.fspath(model_path)

    def activate_impl(self):
        self.model = onnx.load(self.model_path)

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        meta = TensorMetadata()
        initializers = {i.name for i in self.model.graph.initializer}
        for vi in self.model.graph.input:
            if vi.name in initializers:
                continue
            t = vi.type.tensor_type
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            meta.add(vi.name, dtype=DataType.from_dtype(np_dtype), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        import torch

        from tq_deploy.validate.reference import reference_outputs

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()}
        start = time.perf_counter()
        outputs = reference_outputs(self.model, inputs)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((k, v.detach().cpu().numpy()) for k, v in outputs.items())

    def deactivate_impl(self):
        del self.model


def onnxrt_runner(model_path: str | os.PathLike, providers=("CPUExecutionProvider",)):
    """polygraphy's OnnxrtRunner on a session with our custom-op library registered."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from tq_deploy.runtime.session import make_session

    return OnnxrtRunner(lambda: make_session(os.fspath(model_path), providers=providers), name="onnxrt-turboquant")


def tensorrt_usable() -> tuple[bool, str]:
    """Whether a TensorRT runner can run here, and why not."""
    from tq_deploy.runtime import tensorrt as rt

    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device: TensorRT engines build here but cannot run"
        trt = rt.import_tensorrt()
        rt.load_plugins(trt)
        if rt.backend_name(trt) == "rtx" and torch.cuda.get_device_capability() == (9, 0):
            return False, "TensorRT-RTX refuses compute capability 9.0 (H100/H200); full TensorRT is needed"
        return True, f"{trt.__name__} {trt.__version__}"
    except Exception as err:  # noqa: BLE001 - any failure means not usable, with the reason
        return False, f"{type(err).__name__}: {err}"


def trt_runner(model_path: str | os.PathLike, dims=None):
    """polygraphy TrtRunner on an engine built with the plugins (uint8 codes fed as int8 views).

    NOT RUN here: no GPU on the CPU machine, and TensorRT-RTX refuses the H200.
    """
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, Profile, TrtRunner

    from tq_deploy.runtime import tensorrt as rt

    profile = Profile()
    for name, (lo, opt, hi) in rt.profile_shapes(onnx.load(os.fspath(model_path)), dims).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    engine = EngineFromNetwork(lambda: network_from_onnx(model_path), config=CreateConfig(profiles=[profile]))

    class CodesAsInt8TrtRunner(TrtRunner):
        def infer_impl(self, feed_dict, *args, **kwargs):
            feed = {k: (v.view(np.int8) if v.dtype == np.uint8 else v) for k, v in feed_dict.items()}
            out = super().infer_impl(feed, *args, **kwargs)
            return OrderedDict((k, v.view(np.uint8) if v.dtype == np.int8 else v) for k, v in out.items())

    return CodesAsInt8TrtRunner(engine, name="trt-turboquant")


# ---------------------------------------------------------------- comparison

def compare_with_polygraphy(model_path: str | os.PathLike, *, seed: int = 0, with_tensorrt: bool | None = None,
                            providers=("CPUExecutionProvider",), verbose: bool = False) -> dict:
    """Run ORT, the reference and (when usable) TensorRT through polygraphy's Comparator on the
    same random valid inputs; compare every runner with the reference.

    Returns {"runners": [...], "tensorrt": reason, "reports": {runner: ComparisonReport dict},
    "passed": bool}. ``with_tensorrt=None`` adds TensorRT when :func:`tensorrt_usable`.
    polygraphy's own log (inputs, per-runner timing) is shown only with ``verbose=True``.
    """
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from tq_deploy.validate.compare import compare
    from tq_deploy.validate.inputs import random_inputs
    from tq_deploy.validate.reference import bits_of_outputs

    model = onnx.load(os.fspath(model_path))
    feeds = {k: v.detach().cpu().numpy() for k, v in random_inputs(model, seed=seed).items()}
    usable, why = tensorrt_usable()
    reference = ReferenceRunner(model_path, name="tq-reference")
    runners = [reference, onnxrt_runner(model_path, providers)]
    if with_tensorrt or (with_tensorrt is None and usable):
        runners.append(trt_runner(model_path))
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=[feeds])
    expected = dict(results[reference.name][0])
    code_bits = bits_of_outputs(model)
    reports = {}
    for runner in runners[1:]:
        actual = dict(results[runner.name][0])
        report = compare(actual, expected, title=f"{runner.name} vs {reference.name} ({Path(model_path).name})",
                         code_bits=code_bits)
        reports[runner.name] = report
    return {
        "model": os.fspath(model_path),
        "seed": seed,
        "runners": [r.name for r in runners],
        "tensorrt": why if not any(r.name == "trt-turboquant" for r in runners) else "ran",
        "reports": {k: v.to_dict() for k, v in reports.items()},
        "text": "\n\n".join(v.to_text() for v in reports.values()),
        "passed": all(v.passed for v in reports.values()),
    }
