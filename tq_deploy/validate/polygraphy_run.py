"""polygraphy runs of models with TurboQuant ops: the PyTorch reference, ONNX Runtime (CPU and CUDA EP)
and TensorRT, through polygraphy's Comparator.

1. TensorRT through the polygraphy CLI (a network script: ``--plugins`` only ctypes-loads a file,
   it does not register a V3 plugin library, and RTX's network has no add_plugin_v3)::

       POLYGRAPHY_USE_TENSORRT_RTX=1 TQ_ONNX_MODEL=model.onnx \\
         polygraphy run tq_deploy/validate/polygraphy_run.py:load_network \\
           --model-type trt-network-script --trt --save-engine model.engine \\
           --trt-min-shapes query:[1,8,64] ... --trt-opt-shapes ... --trt-max-shapes ...

   (``POLYGRAPHY_USE_TENSORRT_RTX=1`` needs the wrapper package tensorrt-rtx-cu13==1.7.1.116;
   without it polygraphy imports full TensorRT.) To only build, use ``polygraphy convert`` with
   the same script and ``-o model.engine``.

2. Python, :func:`compare_with_polygraphy` (what ``tq-deploy validate`` and the pipeline run):
       * :class:`ReferenceRunner`, a polygraphy BaseRunner that runs tq_deploy.reference,
       * ``OnnxrtRunner`` with sessions made by tq_deploy.runtime.session.make_session on the CPU EP
         and, where onnxruntime-gpu and a CUDA device are present, on the CUDA EP (polygraphy's own
         SessionFromOnnx cannot register a custom-op library),
       * ``TrtRunner`` on an engine (given, or built with the TurboQuant plugins) where TensorRT can
         run it (TensorRT-RTX refuses compute capability 9.0).
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

def load_network():
    """polygraphy ``trt-network-script`` entry point: the model named by env TQ_ONNX_MODEL."""
    from tq_deploy.runtime import tensorrt as rt

    path = os.environ.get(ENV_MODEL)
    if not path or not Path(path).is_file():
        raise ValueError(f"{ENV_MODEL}={path!r}, expected the path of an .onnx model with turboquant ops")
    return rt.network_from_onnx(path, rt.polygraphy_tensorrt())


# ---------------------------------------------------------------- runners

def _base_runner():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


class ReferenceRunner(_base_runner()):
    """A polygraphy runner whose 'inference' is tq_deploy.reference on the model's stored config
    (tq_deploy.validate.reference.reference_outputs): the oracle every backend is compared with.

    ``known`` holds (feeds, outputs) pairs already computed: a feed equal to one of them returns
    its outputs instead of running the reference again."""

    def __init__(self, model, name: str | None = None, known=()):
        from tq_deploy.export.loaded import ExportedModel

        super().__init__(name=name, prefix="tq-reference-runner")
        self.exported = ExportedModel.of(model)
        self.model = self.exported.proto
        self.known = list(known)

    def activate_impl(self):
        pass

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

        start = time.perf_counter()
        for feeds, outputs in self.known:
            if feeds.keys() == feed_dict.keys() and all(np.array_equal(feeds[k], feed_dict[k]) for k in feeds):
                self.inference_time = time.perf_counter() - start
                return OrderedDict((k, np.asarray(v)) for k, v in outputs.items())
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()}
        outputs = reference_outputs(self.exported, inputs)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((k, v.detach().cpu().numpy()) for k, v in outputs.items())

    def deactivate_impl(self):
        pass


def onnxrt_runner(model: onnx.ModelProto, provider: str = "cpu", library=None):
    """polygraphy's OnnxrtRunner on a session with our custom-op library registered."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from tq_deploy.runtime.session import make_session

    data = model.SerializeToString()
    return OnnxrtRunner(lambda: make_session(data, provider=provider, library=library), name=f"onnxrt-{provider}")


def trt_runner(model: onnx.ModelProto, engine: str | os.PathLike | None = None, dims=None):
    """polygraphy TrtRunner on ``engine`` (else one built from the model), uint8 codes fed as int8 views.

    Runs only where TensorRT accepts the GPU (TensorRT-RTX refuses the H200)."""
    from polygraphy.backend.trt import BytesFromPath, CreateConfig, EngineFromBytes, EngineFromNetwork, Profile
    from polygraphy.backend.trt import TrtRunner

    from tq_deploy.runtime import tensorrt as rt

    if engine is not None:
        rt.load_plugins(rt.polygraphy_tensorrt())
        loader = EngineFromBytes(BytesFromPath(os.fspath(engine)))
    else:
        profile = Profile()
        for name, (lo, opt, hi) in rt.profile_shapes(model, dims).items():
            profile.add(name, min=lo, opt=opt, max=hi)
        loader = EngineFromNetwork(lambda: rt.network_from_onnx(model, rt.polygraphy_tensorrt()),
                                   config=CreateConfig(profiles=[profile]))

    class CodesAsInt8TrtRunner(TrtRunner):
        def infer_impl(self, feed_dict, *args, **kwargs):
            feed = {k: (v.view(np.int8) if v.dtype == np.uint8 else v) for k, v in feed_dict.items()}
            out = super().infer_impl(feed, *args, **kwargs)
            return OrderedDict((k, v.view(np.uint8) if v.dtype == np.int8 else v) for k, v in out.items())

    return CodesAsInt8TrtRunner(loader, name="trt-turboquant")


# ---------------------------------------------------------------- comparison

def compare_with_polygraphy(model: "str | os.PathLike | onnx.ModelProto | ExportedModel", *, feeds: dict | None = None,
                            expected: dict | None = None, seed: int = 0, engine: str | os.PathLike | None = None,
                            with_tensorrt: bool | None = None, library=None, verbose: bool = False) -> dict:
    """Run the reference, ONNX Runtime (CPU, and CUDA where it runs) and TensorRT (where it runs)
    through polygraphy's Comparator on the same inputs; compare every runner with the reference.

    ``feeds`` (torch tensors by input name; default: fresh random valid inputs from ``seed``) and
    ``expected`` (the reference's outputs for them, when already computed) let a caller hand over
    what it has; ``library`` defaults to the ExportedModel's. Returns {"runners": [...], "skipped": {runner: why}, "reports": {runner: report
    dict}, "text": str, "passed": bool}."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from tq_deploy.runtime.session import cuda_unavailable_reason
    from tq_deploy.runtime.tensorrt import tensorrt_usable
    from tq_deploy.validate.inputs import random_inputs
    from tq_deploy.validate.reference import judge

    from tq_deploy.export.loaded import ExportedModel

    exported = ExportedModel.of(model)
    model, library = exported.proto, library or exported.library
    if feeds is None:
        feeds = random_inputs(exported, seed=seed)
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
    known = [] if expected is None else [(arrays, {k: v.detach().cpu().numpy() for k, v in expected.items()})]
    reference = ReferenceRunner(exported, name="tq-reference", known=known)
    runners, skipped = [reference, onnxrt_runner(model, "cpu", library)], {}
    why_not_cuda = cuda_unavailable_reason()
    if why_not_cuda:
        skipped["onnxrt-cuda"] = why_not_cuda
    else:
        runners.append(onnxrt_runner(model, "cuda", library))
    usable, why = tensorrt_usable()
    if with_tensorrt or (with_tensorrt is None and usable):
        runners.append(trt_runner(model, engine))
    else:
        skipped["trt-turboquant"] = why if not usable else "not asked for"
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=[arrays])
    expected_arrays = dict(results[reference.name][0])
    reports = {}
    for runner in runners[1:]:
        actual = dict(results[runner.name][0])
        reports[runner.name] = judge(exported, arrays, actual, expected_arrays, f"{runner.name} vs {reference.name}")
    return {
        "seed": seed,
        "runners": [r.name for r in runners],
        "skipped": skipped,
        "tensorrt": why if "trt-turboquant" in skipped else "ran",
        "reports": {k: v.to_dict() for k, v in reports.items()},
        "text": "\n\n".join(v.to_text() for v in reports.values()),
        "passed": all(v.passed for v in reports.values()),
    }
