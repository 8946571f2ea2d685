"""The fuzzer (tq_deploy.validate.fuzz): a short seeded run of the ORT ops and the PyTorch API against
the reference (the long run is `tq-deploy fuzz --cases 100000`), and checks that the fuzzer itself
can fail: it reports a crashed or hung child, and its agreement test flags wrong outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tq_deploy.validate import fuzz

pytest.importorskip("onnxruntime")


def test_short_run_finds_nothing(seed, ort_library):
    """CI's share of the fuzzing: a fresh seed each run (printed; replay one case with
    `tq-deploy fuzz --seed SEED --first CASE --cases 1`)."""
    report = fuzz.fuzz(seed, 200, batch=200, timeout=120)
    assert report.batches == 1 and report.valid > 90 and report.cases - report.valid > 40, report.to_text()
    assert report.passed, report.to_text()


def test_cases_replay_from_seed_and_index():
    a, b = fuzz.draw_case(5, 17), fuzz.draw_case(5, 17)
    assert a.describe() == b.describe()
    assert all(np.array_equal(a.inputs[k], b.inputs[k], equal_nan=a.inputs[k].dtype.kind == "f") for k in a.inputs)
    assert fuzz.draw_case(5, 18).describe() != a.describe()


def test_a_crashing_or_hanging_child_is_reported_and_the_run_goes_on(monkeypatch, ort_library):
    """Case 1 kills its child (abort, as a segfault would), case 3 never answers: one finding each,
    and the cases after the crash still run, in a new child."""
    monkeypatch.setenv("TQ_DEPLOY_FUZZ_ABORT_AT", "1")
    monkeypatch.setenv("TQ_DEPLOY_FUZZ_HANG_AT", "3")
    report = fuzz.fuzz(11, 4, batch=4, timeout=6, op_names=("TQEncode",))
    assert [(f.case, f.kind) for f in report.findings] == [(1, "crash"), (3, "hang")], report.to_text()
    assert "status -6" in report.findings[0].detail  # SIGABRT
    assert report.batches == 2


def _valid_case(op, seed=0):
    for index in range(500):
        case = fuzz.draw_case(seed, index, (op,))
        if not case.defect and all(v.size for v in case.inputs.values()) and \
                all(np.isfinite(v).all() for v in case.inputs.values() if v.dtype.kind == "f"):
            return case
    raise AssertionError(f"no finite valid {op} case in 500 draws")


def test_agreement_flags_a_wrong_attention_value():
    case = _valid_case("TQPagedAttention")
    want = fuzz.run_torch(case)
    assert fuzz.agree(case, want, want) == ""
    got = {"out": want["out"].copy()}
    assert got["out"].size, case.describe()
    got["out"].reshape(-1)[0] += 1e-2 * np.abs(want["out"]).max() + 1e-3
    assert "out" in fuzz.agree(case, got, want)
    got = {"out": want["out"].copy()}
    got["out"].reshape(-1, got["out"].shape[-1])[0, 0] = np.nan
    assert "non-finite" in fuzz.agree(case, got, want)


def test_agreement_flags_a_code_that_is_not_a_tie():
    case = _valid_case("TQEncode")
    want = fuzz.run_torch(case)
    bits = case.attrs["bits"][0]
    got = {"norms": want["norms"], "codes": want["codes"].copy()}
    got["codes"].reshape(-1)[0] ^= 1 << (bits - 1) if bits > 1 else 1  # a code far from any tie
    assert "code" in fuzz.agree(case, got, want)


def test_every_op_of_the_contract_is_fuzzed_or_said_why_not():
    """The fuzzer's op list is the contract's: each op is drawn, or left out with a reason."""
    from tq_deploy import ops

    runnable, left_out = fuzz.coverage()
    assert set(runnable) | set(left_out) == {spec.name for spec in ops.ALL_OPS}
    assert all(why for why in left_out.values())
    for op in runnable:
        case = fuzz.draw_case(3, 0, (op,))
        spec = ops.OPS_BY_NAME[op]
        names = list(case.inputs)
        assert case.op == op and names[:len(spec.required_inputs())] == [t.name for t in spec.required_inputs()]
        assert set(names[len(spec.required_inputs()):]) <= {t.name for t in spec.inputs if t.optional}
        assert fuzz.defects_of(ops.OPS_BY_NAME[op])


def test_an_op_onnx_runtime_lacks_is_skipped_and_named(ort_library, tmp_path):
    """A runner that skips an op (its library has no kernel) runs nothing for it, and the report
    says so instead of listing every case as refused."""
    case = _valid_case("TQEncode")
    broken = fuzz.OrtRunner(library=tmp_path / "missing.so")  # every session fails to build
    assert fuzz.check_case(case, broken), "a runner that cannot build a session must be a finding"
    assert fuzz.check_case(case, fuzz.OrtRunner(library=tmp_path / "missing.so", skip=("TQEncode",))) == []
    report = fuzz.FuzzReport(0, 0, 1, ort_skipped={"TQEncode": "not a registered function/op"})
    assert "TQEncode: ONNX Runtime not run" in report.to_text()
    assert fuzz.ort_kernels_missing(None, ("TQEncode", "TQPagedAttention")) == {}


def test_an_op_without_a_drawer_is_fuzzed_from_its_make_inputs_entry(ort_library):
    """The fallback drawer of a new op: valid calls built by the op's make_inputs entry pass every
    runner that has the op (this holds for every op of the contract, drawer or not)."""
    from tq_deploy import ops
    from tq_deploy.validate.fuzz import draw

    ops_here = fuzz.coverage()[0]
    ort = fuzz.OrtRunner(skip=fuzz.ort_kernels_missing(None, ops_here))
    for op in ops_here:
        for index in range(6):
            rng = np.random.default_rng([9, index])
            case = draw.contract_case(rng, index, int(rng.choice(draw.DIMS)), np.float32, op)
            assert list(case.inputs) == [t.name for t in ops.OPS_BY_NAME[op].required_inputs()]
            assert fuzz.check_case(case, ort) == [], case.describe()
