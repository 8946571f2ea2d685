"""Compare a runtime's outputs with the PyTorch reference's.

Per output:
    max_abs   max |actual - expected|           (codes: in code units, after unpacking)
    max_rel   max |actual - expected| / |expected| over elements with |expected| > atol
    mismatch  fraction of elements outside |a - e| <= atol + rtol * |e|
              (packed codes: fraction of codes that differ, after unpacking)
An output passes when its shape and dtype match and ``mismatch`` is at most the
allowed fraction (floats: ``float_mismatch``, default 0; codes:
``code_mismatch``; other integers: none). Codes may legitimately differ where a
rotated coordinate falls within float rounding of a decision boundary, so a tiny
fraction is allowed. A float output with a NaN or infinity fails, on either side:
a non-finite reference value would otherwise compare as no mismatch (NaN > tol
is false) and pass whatever the runtime gave.

``max_rel`` is reported, not judged: with no mismatch allowed every element already
has |a - e| <= atol + rtol * |e|, i.e. a relative error of at most rtol + atol / |e|,
and a relative bound alone would fail correct outputs at values just above atol.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tq_deploy.reference.packing import unpack_codes


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3
    float_mismatch: float = 0.0
    code_mismatch: float = 1e-3

    @classmethod
    def for_dtype(cls, dtype) -> "Tolerance":
        """Defaults for outputs of ``dtype``: float16 gets half-precision tolerances."""
        if np.dtype(dtype) == np.float16:
            return cls(atol=2e-3, rtol=1e-2)
        return cls()


@dataclass
class OutputComparison:
    name: str
    shape: tuple
    dtype: str
    max_abs: float
    max_rel: float
    mismatch: float
    passed: bool
    note: str = ""


@dataclass
class ComparisonReport:
    title: str
    outputs: list[OutputComparison] = field(default_factory=list)
    tolerance: Tolerance = field(default_factory=Tolerance)
    extra: dict = field(default_factory=dict)  # e.g. timing, providers, model path

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {"title": self.title, "passed": self.passed, "tolerance": asdict(self.tolerance),
                "outputs": [asdict(o) for o in self.outputs], **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_text(self) -> str:
        header = ("output", "shape", "dtype", "max_abs", "max_rel", "mismatch", "ok")
        rows = [header] + [
            (o.name, "x".join(map(str, o.shape)) or "scalar", o.dtype, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
             f"{o.mismatch:.3g}", ("yes" if o.passed else "NO") + (f" ({o.note})" if o.note else ""))
            for o in self.outputs
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [self.title]
        for k, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        t = self.tolerance
        lines.append(f"tolerance: atol={t.atol:g} rtol={t.rtol:g} float mismatch<={t.float_mismatch:g} "
                     f"code mismatch<={t.code_mismatch:g}")
        lines.append("result: " + ("within tolerance" if self.passed else "OUTSIDE TOLERANCE"))
        return "\n".join(lines)


def _np(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def compare_output(name: str, actual, expected, tolerance: Tolerance, code_bits: tuple[int, int] | None = None):
    a, e = _np(actual), _np(expected)
    if a.shape != e.shape or a.dtype != e.dtype:
        return OutputComparison(name, tuple(a.shape), str(a.dtype), float("inf"), float("inf"), 1.0, False,
                                f"expected shape {tuple(e.shape)} dtype {e.dtype}")
    if a.size == 0:
        return OutputComparison(name, tuple(a.shape), str(a.dtype), 0.0, 0.0, 0.0, True, "empty")
    if code_bits is not None:
        bits, dim = code_bits
        ca = unpack_codes(torch.from_numpy(a), bits, dim).numpy().astype(np.int64)
        ce = unpack_codes(torch.from_numpy(e), bits, dim).numpy().astype(np.int64)
        diff = np.abs(ca - ce)
        mismatch = float(np.mean(diff != 0))
        return OutputComparison(name, tuple(a.shape), str(a.dtype), float(diff.max()), float(diff.max()), mismatch,
                                mismatch <= tolerance.code_mismatch, f"{bits}-bit codes")
    if not np.issubdtype(a.dtype, np.floating):
        diff = np.abs(a.astype(np.int64) - e.astype(np.int64))
        mismatch = float(np.mean(diff != 0))
        return OutputComparison(name, tuple(a.shape), str(a.dtype), float(diff.max()), float(diff.max()), mismatch,
                                mismatch == 0.0, "exact")
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    if not np.all(np.isfinite(a64)):
        return OutputComparison(name, tuple(a.shape), str(a.dtype), float("inf"), float("inf"), 1.0, False,
                                "non-finite values")
    if not np.all(np.isfinite(e64)):
        return OutputComparison(name, tuple(a.shape), str(a.dtype), float("inf"), float("inf"), 1.0, False,
                                "non-finite expected values")
    diff = np.abs(a64 - e64)
    big = np.abs(e64) > tolerance.atol
    max_rel = float((diff[big] / np.abs(e64[big])).max()) if big.any() else 0.0
    mismatch = float(np.mean(diff > tolerance.atol + tolerance.rtol * np.abs(e64)))
    return OutputComparison(name, tuple(a.shape), str(a.dtype), float(diff.max()), max_rel, mismatch,
                            mismatch <= tolerance.float_mismatch)


def compare(actual: dict, expected: dict, *, title: str = "comparison", tolerance: Tolerance | None = None,
            code_bits: dict | None = None) -> ComparisonReport:
    """Report on every expected output; a missing output fails. ``code_bits``: name -> (bits, head_dim)."""
    code_bits = code_bits or {}
    report = ComparisonReport(title, tolerance=tolerance or Tolerance())
    for name, exp in expected.items():
        tol = tolerance or Tolerance.for_dtype(_np(exp).dtype)
        if name not in actual:
            report.outputs.append(OutputComparison(name, tuple(_np(exp).shape), str(_np(exp).dtype), float("inf"),
                                                   float("inf"), 1.0, False, "missing"))
            continue
        row = compare_output(name, actual[name], exp, tol, code_bits.get(name))
        if tol != report.tolerance and not row.note:
            row.note = f"{row.dtype} tolerance atol={tol.atol:g} rtol={tol.rtol:g}"
        report.outputs.append(row)
    return report
