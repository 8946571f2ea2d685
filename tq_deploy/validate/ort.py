"""Run a model in ONNX Runtime (CPU or CUDA EP) and compare it with the PyTorch reference."""

from __future__ import annotations

import onnx

from tq_deploy.export.loaded import ExportedModel
from tq_deploy.runtime.session import make_session, time_runs
from tq_deploy.validate.compare import ComparisonReport, Tolerance, compare
from tq_deploy.validate.reference import bits_of_outputs


def validate_with_ort(model: ExportedModel | onnx.ModelProto, feeds: dict, expected: dict, *, provider: str = "cpu",
                      library=None, repeat: int = 1, tolerance: Tolerance | None = None) -> ComparisonReport:
    """ORT outputs for ``feeds`` vs ``expected`` (the reference's outputs for them); the session's
    providers and the timing of ``repeat`` runs go in ``report.extra``. ``library``: the custom-op
    library (default: the model's, else the built one)."""
    model = ExportedModel.of(model)
    session = make_session(model.serialized, provider=provider, library=library or model.library)
    outputs, timing = time_runs(session, feeds, repeat=repeat, warmup=0 if repeat == 1 else 1)
    title = f"ONNX Runtime ({', '.join(session.get_providers())}) vs PyTorch reference"
    if model.kind == "llm":  # the reference aligned to this backend's codes: validate/llm.py
        from tq_deploy.validate.llm import compare_llm

        report = compare_llm(model, feeds, outputs, title)
    else:
        report = compare(outputs, expected, title=title, tolerance=tolerance, code_bits=bits_of_outputs(model))
    report.extra.update({
        "providers": session.get_providers(),
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "ort_ms_mean": timing.mean_ms,
        "ort_ms_min": timing.min_ms,
        "repeat": timing.repeat,
    })
    return report
