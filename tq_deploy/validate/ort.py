"""Run a model in ONNX Runtime (CPU or CUDA EP) and compare it with the PyTorch reference."""

from __future__ import annotations

import onnx

from tq_deploy.runtime.session import make_session, time_runs
from tq_deploy.validate.compare import ComparisonReport, Tolerance, compare
from tq_deploy.validate.reference import bits_of_outputs


def validate_with_ort(model: onnx.ModelProto, feeds: dict, expected: dict, *, provider: str = "cpu", library=None,
                      repeat: int = 1, tolerance: Tolerance | None = None) -> ComparisonReport:
    """ORT outputs for ``feeds`` vs ``expected`` (the reference's outputs for them); the session's
    providers and the timing of ``repeat`` runs go in ``report.extra``."""
    session = make_session(model.SerializeToString(), provider=provider, library=library)
    outputs, timing = time_runs(session, feeds, repeat=repeat, warmup=0 if repeat == 1 else 1)
    title = f"ONNX Runtime ({', '.join(session.get_providers())}) vs PyTorch reference"
    report = compare(outputs, expected, title=title, tolerance=tolerance, code_bits=bits_of_outputs(model))
    report.extra.update({
        "providers": session.get_providers(),
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "ort_ms_mean": timing.mean_ms,
        "ort_ms_min": timing.min_ms,
        "repeat": timing.repeat,
    })
    return report
