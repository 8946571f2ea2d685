"""The CLI's export / run / pipeline commands end to end, and the comparison report itself."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tq_deploy.cli import main
from tq_deploy.export import read_metadata
from tq_deploy.export.schemas import register_schemas
from tq_deploy.validate.compare import Tolerance, compare


def test_pipeline_runs_end_to_end_within_tolerance(tmp_path, capsys, ort_library):
    status = main(["pipeline", "--synthetic", "--out-dir", str(tmp_path), "--json", "--repeat", "1",
                   "--hidden-size", "96", "--num-q-heads", "6", "--num-kv-heads", "2", "--k-bits", "3",
                   "--v-bits", "2", "--block-size", "8", "--num-blocks", "24", "--max-blocks", "6"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0, report
    assert report["passed"] is True
    assert [o["name"] for o in report["outputs"]] == ["out", "k_codes_out", "k_norms_out", "v_codes_out", "v_norms_out"]
    assert all(o["passed"] for o in report["outputs"])
    assert report["custom_ops"] == ["TQCacheUpdate", "TQPagedAttention"]
    assert report["config"]["k_bits"] == 3 and report["config"]["v_bits"] == 2
    _check_tensorrt_stage(report["tensorrt"], tmp_path)
    polygraphy = report["polygraphy"]
    if polygraphy["status"] == "ran":
        assert polygraphy["passed"] is True and "onnxrt-cpu" in " ".join(polygraphy["runners"]), polygraphy
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"), full_check=True)


def test_pipeline_text_report(tmp_path, capsys, ort_library):
    assert main(["pipeline", "--synthetic", "--out-dir", str(tmp_path), "--repeat", "1", "--hidden-size", "64",
                 "--num-q-heads", "2", "--num-kv-heads", "1", "--head-dim", "32", "--bits", "4"]) == 0
    text = capsys.readouterr().out
    assert "result: within tolerance" in text and "result: PASSED" in text
    assert "6. engine   " in text and "7. polygraphy  " in text


def _tensorrt_expected() -> bool:
    """True where an engine must build: TensorRT(-RTX) imports and the plugin library exists."""
    from tq_deploy.runtime.tensorrt import import_tensorrt, plugin_library_path

    try:
        import_tensorrt()
        plugin_library_path()
    except Exception:
        return False
    return True


def _check_tensorrt_stage(stage: dict, out_dir) -> None:
    if _tensorrt_expected():
        assert stage["status"] == "built", stage
        engine = out_dir / "model.engine"
        assert engine.exists() and engine.stat().st_size == stage["engine_bytes"] > 0
    else:
        assert stage["status"] == "skipped" and stage["reason"], stage


def test_export_cli_writes_a_valid_single_op_file(tmp_path, capsys):
    path = tmp_path / "enc.onnx"
    assert main(["export", "--out", str(path), "--op", "TQEncode", "--bits", "3", "--head-dim", "96"]) == 0
    assert "output codes" in capsys.readouterr().out
    register_schemas()
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    kind, config = read_metadata(model)
    assert kind == "op" and config["op"] == "TQEncode" and config["bits"] == 3 and config["head_dim"] == 96
    assert model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 36


def test_export_cli_rejects_bad_options(capsys):
    assert main(["export", "--out", "x.onnx", "--num-q-heads", "6", "--num-kv-heads", "4"]) == 2
    assert "num_q_heads=6" in capsys.readouterr().err


def test_run_cli_with_given_inputs_and_compare(tmp_path, capsys, ort_library):
    from tq_deploy.validate.inputs import as_numpy, random_inputs

    path = tmp_path / "attn.onnx"
    assert main(["export", "--out", str(path), "--op", "TQPagedAttention", "--k-bits", "4", "--v-bits", "3",
                 "--head-dim", "64", "--num-q-heads", "4", "--num-kv-heads", "2", "--block-size", "8"]) == 0
    inputs = random_inputs(onnx.load(path), seed=7, context_lens=[0, 1, 9, 20])
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **as_numpy(inputs))
    capsys.readouterr()
    status = main(["run", str(path), "--inputs", str(npz), "--repeat", "2", "--compare", "--json",
                   "--save-outputs", str(tmp_path / "out.npz")])
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["comparison"]["passed"] is True
    assert result["outputs"]["out"]["shape"] == [4, 4, 64]
    with np.load(tmp_path / "out.npz") as saved:
        assert np.all(saved["out"][0] == 0)  # context length 0 gives zeros


def test_run_cli_random_inputs_for_the_decode_model(tmp_path, capsys, ort_library):
    path = tmp_path / "model.onnx"
    assert main(["export", "--out", str(path), "--hidden-size", "64", "--num-q-heads", "4", "--num-kv-heads", "4",
                 "--head-dim", "16", "--bits", "2"]) == 0
    assert main(["run", str(path), "--repeat", "3", "--context-lens", "1", "17", "--compare"]) == 0
    text = capsys.readouterr().out
    assert "output out" in text and "[2, 64]" in text and "within tolerance" in text


def test_compare_flags_wrong_outputs():
    gen = torch.Generator().manual_seed(0)
    expected = {"out": torch.randn(4, 8, generator=gen), "codes": torch.randint(0, 256, (64, 12), generator=gen,
                                                                                 dtype=torch.uint8)}
    good = {k: v.clone() for k, v in expected.items()}
    bits = {"codes": (3, 32)}
    assert compare(good, expected, code_bits=bits).passed

    off = dict(good, out=good["out"] + 1e-2)
    report = compare(off, expected, code_bits=bits)
    assert not report.passed and "OUTSIDE TOLERANCE" in report.to_text()
    row = report.outputs[0]
    assert row.name == "out" and row.mismatch > 0 and row.max_abs == pytest.approx(1e-2, rel=1e-3)

    flipped = good["codes"].clone()
    flipped[0, 0] ^= 0b111  # first 3-bit code of vector 0 changes
    report = compare(dict(good, codes=flipped), expected, code_bits=bits)
    codes_row = report.outputs[1]
    assert codes_row.mismatch == pytest.approx(1 / (64 * 32))
    assert codes_row.passed  # within the default 1e-3 allowance...
    assert not compare(dict(good, codes=flipped), expected, code_bits=bits,
                       tolerance=Tolerance(code_mismatch=0.0)).passed  # ...but not with none

    assert not compare({"out": good["out"]}, expected).passed  # a missing output fails
    assert not compare(dict(good, out=good["out"][:2]), expected).passed  # wrong shape fails
    nan = good["out"].clone()
    nan[1, 1] = float("nan")
    assert not compare(dict(good, out=nan), expected).passed


def test_run_cli_without_the_library_is_one_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "dec.onnx"
    assert main(["export", "--out", str(path), "--op", "TQDecode", "--bits", "2", "--head-dim", "16"]) == 0
    monkeypatch.setenv("TQ_DEPLOY_ORT_LIBRARY", str(tmp_path / "missing.so"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tq-deploy run: error:") and "missing.so" in err and err.count("\n") == 1


def test_exported_model_reads_its_metadata_once_and_runs_without_it(tmp_path, monkeypatch):
    """The loaded model (proto, metadata, config, library) is what the steps share: its metadata is
    parsed on first use only, and a proto without tq-deploy metadata is refused only when asked."""
    import onnx

    from tq_deploy.export import common, make_op_model
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.validate.inputs import random_inputs
    from tq_deploy.validate.reference import bits_of_outputs, reference_outputs

    path = tmp_path / "encode.onnx"
    common.save_model(make_op_model("TQEncode", head_dim=16, bits=3), path)
    model = ExportedModel.load(path, library="lib.so")
    assert (model.name, model.library, model.custom_ops) == ("encode", "lib.so", ["TQEncode"])
    reads = []
    real = common.read_metadata
    monkeypatch.setattr("tq_deploy.export.loaded.read_metadata", lambda m: reads.append(1) or real(m))
    feeds = random_inputs(model, seed=0)
    assert set(reference_outputs(model, feeds)) == {"codes", "norms"}
    assert bits_of_outputs(model) == {"codes": (3, 16)}
    assert len(reads) == 1 and model.kind == "op" and model.metadata["bits"] == 3
    bare = onnx.load(path)
    del bare.metadata_props[:]
    plain = ExportedModel.of(bare)
    assert plain.serialized == bare.SerializeToString()
    with pytest.raises(ValueError, match="metadata_props"):
        plain.kind
    with pytest.raises(ValueError, match="expected 'model'"):
        model.config
