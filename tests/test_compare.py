"""tq_deploy.validate.compare, the comparison whose verdict the pipeline, `run --compare` and
`validate` report: every output judged on its own, each allowance at its documented size, and the
reported numbers (max_abs, max_rel, mismatch) computed as the module docstring defines them.

Expected values here are written by hand (never produced by compare itself); the tolerance
boundaries are probed on both sides.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tq_deploy.reference.packing import pack_codes
from tq_deploy.validate.compare import ComparisonReport, OutputComparison, Tolerance, compare, compare_output

FLOAT = Tolerance()  # atol 1e-4, rtol 1e-3, no float mismatch, 1e-3 code mismatch


def test_documented_tolerances():
    assert (FLOAT.atol, FLOAT.rtol, FLOAT.float_mismatch, FLOAT.code_mismatch) == (1e-4, 1e-3, 0.0, 1e-3)
    half = Tolerance.for_dtype(np.float16)
    assert (half.atol, half.rtol, half.float_mismatch, half.code_mismatch) == (2e-3, 1e-2, 0.0, 1e-3)
    assert Tolerance.for_dtype(np.float32) == FLOAT and Tolerance.for_dtype(np.uint8) == FLOAT


@pytest.mark.parametrize("err,passed", [(1.05e-3, True), (-1.05e-3, True), (1.15e-3, False), (-1.15e-3, False)])
def test_float_bound_is_atol_plus_rtol_times_expected(err, passed):
    """|a - e| <= 1e-4 + 1e-3 * |e| at |e| = 1: an error of 1.05e-3 passes, 1.15e-3 does not."""
    expected = np.array([1.0, -1.0, 0.5], np.float32)
    actual = expected.copy()
    actual[1] += np.float32(err)  # at e = -1: the bound uses |e|
    row = compare_output("x", actual, expected, FLOAT)
    assert row.passed is passed
    assert row.mismatch == pytest.approx(0.0 if passed else 1 / 3)
    assert row.max_abs == pytest.approx(abs(err), rel=1e-3)
    assert row.note == ""


def test_atol_carries_values_near_zero():
    expected = np.zeros(4, np.float32)
    assert compare_output("x", expected + np.float32(0.9e-4), expected, FLOAT).passed
    assert not compare_output("x", expected + np.float32(1.1e-4), expected, FLOAT).passed


def test_one_float_element_in_ten_thousand_fails():
    """The float allowance is none: one wrong element of 10,000 (a fraction of 1e-4, inside the
    code allowance of 1e-3) fails the output."""
    gen = np.random.default_rng(0)
    expected = gen.standard_normal(10_000).astype(np.float32)
    actual = expected.copy()
    actual[1234] += 1.0
    row = compare_output("out", actual, expected, FLOAT)
    assert row.mismatch == pytest.approx(1e-4) and not row.passed
    assert row.max_abs == pytest.approx(1.0, rel=1e-5)
    # an explicit allowance is honoured on both sides of it
    assert compare_output("out", actual, expected, Tolerance(float_mismatch=1e-4)).passed
    assert not compare_output("out", actual, expected, Tolerance(float_mismatch=0.5e-4)).passed
    # and the report as a whole fails
    assert not compare({"out": actual}, {"out": expected}).passed


def test_max_abs_and_max_rel_values():
    """max_rel = max |a - e| / |e| over |e| > atol: the element at |e| = 1e-6 (below atol) has a
    relative error of 50 and is left out; the largest of the others is 4e-3 / 4 = 1e-3."""
    expected = np.array([1.0, 2.0, -4.0, 1e-6], np.float64)
    actual = expected + np.array([1e-4, 1e-3, -4e-3, 5e-5])
    row = compare_output("x", actual, expected, Tolerance(atol=1e-4, rtol=2e-3))
    assert row.max_abs == pytest.approx(4e-3)
    assert row.max_rel == pytest.approx(1e-3)
    assert row.mismatch == 0.0 and row.passed
    # with every |e| <= atol there is no relative error to report
    tiny = np.full(3, 1e-5)
    row = compare_output("x", tiny * 2, tiny, FLOAT)
    assert row.max_rel == 0.0 and row.max_abs == pytest.approx(1e-5) and row.passed
    # the largest relative error need not be at the largest absolute one
    row = compare_output("x", np.array([100.5, 0.011]), np.array([100.0, 0.01]), FLOAT)
    assert row.max_abs == pytest.approx(0.5) and row.max_rel == pytest.approx(0.1)


def test_max_rel_reaches_the_report():
    expected = {"out": np.array([2.0, 4.0], np.float32)}
    report = compare({"out": np.array([2.0, 4.2], np.float32)}, expected, title="t")
    row = report.outputs[0]
    assert row.max_rel == pytest.approx(0.05, rel=1e-5) and row.max_abs == pytest.approx(0.2, rel=1e-5)
    assert report.to_dict()["outputs"][0]["max_rel"] == pytest.approx(0.05, rel=1e-5)
    line = report.to_text().splitlines()[3]
    assert line.split()[3:6] == ["0.2", "0.05", "0.5"], line


def _three_outputs():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (64, 32), generator=gen, dtype=torch.uint8)
    return {
        "out": torch.randn(4, 8, generator=gen),
        "codes": pack_codes(codes, 3),
        "lens": torch.tensor([0, 5, 17], dtype=torch.int32),
    }


BITS = {"codes": (3, 32)}


def _unpacked_flip(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Packed 3-bit codes with the first ``count`` codes of vector 0 changed (0 <-> 7 and so on)."""
    from tq_deploy.reference.packing import unpack_codes

    codes = unpack_codes(packed, 3, 32).clone()
    codes[0, :count] = 7 - codes[0, :count]
    return pack_codes(codes, 3)


@pytest.mark.parametrize("broken", ["out", "codes", "lens"])
def test_every_output_is_judged_on_its_own(broken):
    """Break one output at a time: that row fails, the others pass, the report fails."""
    expected = _three_outputs()
    actual = {k: v.clone() for k, v in expected.items()}
    good = compare(actual, expected, code_bits=BITS)
    assert good.passed and [o.passed for o in good.outputs] == [True, True, True]
    assert [o.name for o in good.outputs] == ["out", "codes", "lens"]
    if broken == "out":
        actual["out"][2, 3] += 0.5
    elif broken == "codes":
        actual["codes"] = _unpacked_flip(actual["codes"], 3)  # 3 of 2048 codes: 1.5e-3 > 1e-3
    else:
        actual["lens"][1] += 1
    report = compare(actual, expected, code_bits=BITS)
    assert not report.passed
    assert {o.name: o.passed for o in report.outputs} == {n: n != broken for n in expected}
    assert "OUTSIDE TOLERANCE" in report.to_text() and report.to_dict()["passed"] is False


def test_code_allowance_and_code_differences():
    expected = _three_outputs()["codes"]
    two = _unpacked_flip(expected, 2)  # 2 of 2048 codes differ: 9.8e-4 <= 1e-3
    row = compare_output("codes", two, expected, FLOAT, (3, 32))
    assert row.passed and row.mismatch == pytest.approx(2 / 2048) and row.note == "3-bit codes"
    assert row.dtype == "uint8" and row.shape == (64, 12)
    assert not compare_output("codes", two, expected, Tolerance(code_mismatch=0.0), (3, 32)).passed
    assert not compare_output("codes", _unpacked_flip(expected, 3), expected, FLOAT, (3, 32)).passed
    # the distance is in code units, after unpacking (a packed byte comparison would see other numbers)
    from tq_deploy.reference.packing import unpack_codes

    codes = unpack_codes(expected, 3, 32).clone()
    codes[5, 7] = 0
    codes[5, 8] = 7
    moved = unpack_codes(expected, 3, 32)
    want = max(int(moved[5, 7]), 7 - int(moved[5, 8]))
    row = compare_output("codes", pack_codes(codes, 3), expected, FLOAT, (3, 32))
    assert row.max_abs == want and row.max_rel == want


def test_integers_must_match_exactly():
    expected = np.array([[0, 5], [17, 2**20]], np.int64)
    assert compare_output("i", expected.copy(), expected, FLOAT).passed
    actual = expected.copy()
    actual[1, 1] -= 3
    row = compare_output("i", actual, expected, Tolerance(float_mismatch=1.0, code_mismatch=1.0))
    assert not row.passed and row.note == "exact" and row.dtype == "int64" and row.shape == (2, 2)
    assert row.max_abs == 3 and row.mismatch == pytest.approx(0.25)
    # unsigned values below each other do not wrap around
    row = compare_output("u", np.array([0, 1], np.uint8), np.array([255, 1], np.uint8), FLOAT)
    assert row.max_abs == 255 and not row.passed


@pytest.mark.parametrize("where", ["actual", "expected"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_fail_on_either_side(where, value):
    expected = np.linspace(-1, 1, 6, dtype=np.float32)
    actual = expected.copy()
    (actual if where == "actual" else expected)[2] = value
    row = compare_output("x", actual, expected, FLOAT)
    assert not row.passed and row.mismatch == 1.0 and row.max_abs == float("inf")
    assert row.note == ("non-finite values" if where == "actual" else "non-finite expected values")


def test_shape_dtype_missing_and_empty():
    expected = {"out": np.ones((2, 3), np.float32)}
    row = compare({"out": np.ones((3, 2), np.float32)}, expected).outputs[0]
    assert not row.passed and row.note == "expected shape (2, 3) dtype float32" and row.shape == (3, 2)
    row = compare({"out": np.ones((2, 3), np.float16)}, expected).outputs[0]
    assert not row.passed and row.note == "expected shape (2, 3) dtype float32" and row.dtype == "float16"
    row = compare({}, expected).outputs[0]
    assert not row.passed and row.note == "missing" and row.shape == (2, 3) and row.dtype == "float32"
    assert row.max_abs == float("inf") and row.mismatch == 1.0
    # an output the reference does not have is not judged; a report with nothing to judge fails
    assert compare({"out": np.ones((2, 3), np.float32), "extra": np.zeros(1)}, expected).passed
    assert not compare({}, {}).passed and not ComparisonReport("t").passed
    empty = compare({"out": np.ones((0, 3), np.float32)}, {"out": np.ones((0, 3), np.float32)})
    assert empty.passed and empty.outputs[0].note == "empty" and empty.outputs[0].max_abs == 0.0
    assert not compare({"out": np.ones((0, 2), np.float32)}, {"out": np.ones((0, 3), np.float32)}).passed


def test_half_outputs_get_half_tolerances_unless_one_is_given():
    expected = np.array([1.0, 2.0], np.float16)
    actual = expected * np.float16(1.005)  # 0.5 %: inside fp16's rtol 1e-2, outside fp32's 1e-3
    report = compare({"h": actual, "f": np.array([1.0], np.float32)}, {"h": expected, "f": np.array([1.0], np.float32)})
    assert report.passed and report.tolerance == FLOAT
    assert report.outputs[0].note == "float16 tolerance atol=0.002 rtol=0.01" and report.outputs[1].note == ""
    assert not compare({"h": actual}, {"h": expected}, tolerance=FLOAT).passed
    assert not compare({"h": expected * np.float16(1.02)}, {"h": expected}).passed


def test_report_text_and_json():
    report = compare({"out": np.array([1.0, 2.0], np.float32)}, {"out": np.array([1.0, 2.5], np.float32)},
                     title="my run", tolerance=Tolerance(atol=1e-3, rtol=1e-2, float_mismatch=0.1, code_mismatch=0.2))
    report.extra["provider"] = "cpu"
    lines = report.to_text().splitlines()
    assert lines[0] == "my run"
    assert lines[1].split() == ["output", "shape", "dtype", "max_abs", "max_rel", "mismatch", "ok"]
    assert set(lines[2]) == {"-", " "}
    assert lines[3].split() == ["out", "2", "float32", "0.5", "0.2", "0.5", "NO"]
    assert lines[4] == "tolerance: atol=0.001 rtol=0.01 float mismatch<=0.1 code mismatch<=0.2"
    assert lines[5] == "result: OUTSIDE TOLERANCE"
    data = json.loads(report.to_json())
    assert data["title"] == "my run" and data["passed"] is False and data["provider"] == "cpu"
    assert data["tolerance"] == {"atol": 1e-3, "rtol": 1e-2, "float_mismatch": 0.1, "code_mismatch": 0.2}
    assert data["outputs"][0]["name"] == "out" and data["outputs"][0]["mismatch"] == 0.5

    ok = compare({"s": np.float32(3.0)}, {"s": np.float32(3.0)}, title="scalar")
    assert ok.to_text().splitlines()[3].split()[:3] == ["s", "scalar", "float32"]
    assert ok.to_text().splitlines()[-1] == "result: within tolerance"
    noted = ComparisonReport("n", outputs=[OutputComparison("c", (4, 2), "uint8", 0, 0, 0, True, "3-bit codes")])
    assert noted.to_text().splitlines()[3].split() == ["c", "4x2", "uint8", "0", "0", "0", "yes", "(3-bit", "codes)"]


INF = float("inf")


def test_rows_of_the_early_verdicts_in_full():
    """Every field of the rows that are decided before any value is compared."""
    f32 = np.ones((2, 3), np.float32)
    assert compare_output("x", np.ones((3, 2), np.float32), f32, FLOAT) == OutputComparison(
        "x", (3, 2), "float32", INF, INF, 1.0, False, "expected shape (2, 3) dtype float32")
    assert compare_output("x", np.ones((0, 3), np.float16), np.ones((0, 3), np.float16), FLOAT) == OutputComparison(
        "x", (0, 3), "float16", 0.0, 0.0, 0.0, True, "empty")
    bad = f32.copy()
    bad[1, 2] = np.nan
    assert compare_output("x", bad, f32, FLOAT) == OutputComparison(
        "x", (2, 3), "float32", INF, INF, 1.0, False, "non-finite values")
    assert compare_output("x", f32, bad, FLOAT) == OutputComparison(
        "x", (2, 3), "float32", INF, INF, 1.0, False, "non-finite expected values")
    report = compare({"b": f32}, {"a": np.ones(4, np.float16), "b": f32, "c": f32})
    assert report.title == "comparison"
    assert report.outputs[0] == OutputComparison("a", (4,), "float16", INF, INF, 1.0, False, "missing")
    # a missing output does not end the comparison: the outputs after it are still judged
    assert [(o.name, o.passed) for o in report.outputs] == [("a", False), ("b", True), ("c", False)]


def test_exact_tolerances_and_the_edges_of_each_allowance():
    """atol = rtol = 0 is an exact comparison (equal values pass); an allowance is 'at most' (a
    mismatch equal to it passes); max_rel counts only |e| strictly above atol."""
    x = np.array([0.0, 1.5, -2.25], np.float32)
    exact = Tolerance(atol=0.0, rtol=0.0)
    assert compare_output("x", x.copy(), x, exact).passed
    assert not compare_output("x", x + np.float32(2.0**-20), x, exact).passed
    expected = _three_outputs()["codes"]
    two = _unpacked_flip(expected, 2)
    assert compare_output("codes", two, expected, Tolerance(code_mismatch=2 / 2048), (3, 32)).passed
    assert not compare_output("codes", two, expected, Tolerance(code_mismatch=1 / 2048), (3, 32)).passed
    row = compare_output("x", np.array([1.0, 2.0]), np.array([0.5, 2.0]), Tolerance(atol=0.5, rtol=1.0))
    assert row.max_rel == 0.0  # the only error sits at |e| = atol, which max_rel leaves out


def test_report_layout():
    """Columns left-aligned and no trailing spaces; JSON indented by 2 and any extra value written
    as text (a path, say)."""
    from pathlib import Path

    report = compare({"out": np.ones(3, np.float32)}, {"out": np.ones(3, np.float32)}, title="t")
    report.extra["model"] = Path("/models/m.onnx")
    lines = report.to_text().splitlines()
    assert lines[1].startswith("output  shape") and lines[3].startswith("out     3 ")
    assert all(line == line.rstrip() for line in lines)
    text = report.to_json()
    assert '\n  "title": "t"' in text and '"model": "/models/m.onnx"' in text
