"""Run an exported model in ONNX Runtime and compare it with the PyTorch reference."""

from __future__ import annotations

import os

import onnx

from tq_deploy.runtime.session import make_session, time_runs
from tq_deploy.validate.compare import ComparisonReport, Tolerance, compare
from tq_deploy.validate.inputs import random_inputs
from tq_deploy.validate.reference import bits_of_outputs, reference_outputs


def validate_with_ort(model: str | os.PathLike | onnx.ModelProto, *, providers=("CPUExecutionProvider",),
                      library=None, seed: int = 0, context_lens=None, inputs: dict | None = None,
                      repeat: int = 1, tolerance: Tolerance | None = None) -> ComparisonReport:
    """ORT outputs vs the reference on fresh random (or given) inputs; timing goes in ``report.extra``."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    source = proto.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    session = make_session(source, providers=providers, library=library)
    if inputs is None:
        inputs = random_inputs(proto, seed=seed, context_lens=context_lens)
    outputs, timing = time_runs(session, inputs, repeat=repeat, warmup=0 if repeat == 1 else 1)
    expected = reference_outputs(proto, inputs)
    title = f"ONNX Runtime ({', '.join(session.get_providers())}) vs PyTorch reference"
    report = compare(outputs, expected, title=title, tolerance=tolerance, code_bits=bits_of_outputs(proto))
    report.extra.update({
        "providers": session.get_providers(),
        "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
        "ort_ms_mean": timing.mean_ms,
        "ort_ms_min": timing.min_ms,
        "repeat": timing.repeat,
    })
    return report
