"""TensorRT engine builds with the TurboQuant plugins (TensorRT-RTX; runs on a machine without a GPU).

What is checked here is real: the plugin library loads into TensorRT-RTX's registry through
getCreators, the ONNX parser maps each "turboquant" node to its plugin, the plugins' shape
expressions and dtypes give the outputs the op contract promises, invalid attributes/shapes are
refused, and build_serialized_network produces an engine with a dynamic profile. Running an engine
needs a GPU TensorRT-RTX supports (not the H200); see tests/test_trt_enqueue_gpu.py for the
plugins' runtime path.
"""

from __future__ import annotations

import onnx
import pytest

from tq_deploy import ops
from tq_deploy.export.single_op import make_op_model
from tq_deploy.runtime import tensorrt as rt


@pytest.fixture(scope="module")
def trt():
    try:
        module = rt.import_tensorrt("rtx")
    except rt.TensorRTUnavailableError as err:
        pytest.skip(f"TensorRT-RTX is not installed (pip install tq-deploy[rtx]): {err}")
    try:
        rt.load_plugins(module)
    except rt.native.NativeLibraryNotFoundError as err:
        pytest.skip(f"libtq_deploy_trt.so is not built: {err}")
    return module


def test_library_registers_every_op(trt):
    creators = {c.name: c for c in trt.get_plugin_registry().all_creators if c.plugin_namespace == ops.DOMAIN}
    assert sorted(creators) == sorted(rt.PLUGIN_NAMES)
    for op in ops.ALL_OPS:
        creator = creators[op.name]
        assert creator.plugin_version == rt.PLUGIN_VERSION
        assert sorted(f.name for f in creator.field_names) == sorted(a.name for a in op.attributes)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k_bits,v_bits,hq,hkv,dim", [(4, 4, 32, 8, 128), (3, 2, 6, 3, 72), (1, 3, 4, 4, 40)])
def test_paged_attention_engine_builds(trt, tmp_path, k_bits, v_bits, hq, hkv, dim, dtype):
    model = make_op_model("TQPagedAttention", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq,
                          num_kv_heads=hkv, dtype=dtype, scale=0.25)
    build = rt.build_engine(model, tmp_path / "pa.engine")
    assert (tmp_path / "pa.engine").stat().st_size == build.engine_bytes > 0
    assert build.backend == "rtx" and build.plugins == sorted(rt.PLUGIN_NAMES)
    assert build.outputs == {"out": ["half" if dtype == "float16" else "float", [-1, hq, dim]]}
    assert build.inputs["k_codes"] == ["int8", [-1, 16, hkv, ops.packed_size(dim, k_bits)]]
    assert build.profile["query"] == [[1, hq, dim], [4, hq, dim], [32, hq, dim]]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_prefill_engine_builds(trt, tmp_path, dtype):
    """The prefill plugin (T query rows, query_start [S+1]) takes part in an engine build."""
    model = make_op_model("TQPagedPrefill", head_dim=72, k_bits=3, v_bits=2, num_q_heads=6, num_kv_heads=3,
                          dtype=dtype)
    build = rt.build_engine(model, tmp_path / "pp.engine")
    assert (tmp_path / "pp.engine").stat().st_size == build.engine_bytes > 0
    assert "TQPagedPrefill" in build.plugins
    assert build.outputs == {"out": ["half" if dtype == "float16" else "float", [-1, 6, 72]]}


@pytest.mark.parametrize("bits,dim", [(3, 72), (4, 128), (1, 37)])
def test_codec_shape_expressions(trt, bits, dim):
    """Encode's packed size comes from the plugin's IExprBuilder expression (static and dynamic D)."""
    enc = rt.build_engine(make_op_model("TQEncode", head_dim=dim, bits=bits, leading_dims=("n", 3)))
    assert enc.outputs == {"codes": ["int8", [-1, 3, ops.packed_size(dim, bits)]], "norms": ["float", [-1, 3]]}
    dec = rt.build_engine(make_op_model("TQDecode", head_dim=dim, bits=bits, leading_dims=("n",)))
    assert dec.outputs == {"x_hat": ["float", [-1, dim]]}


def test_cache_update_engine_aliases_caches(trt):
    model = make_op_model("TQCacheUpdate", head_dim=64, k_bits=4, v_bits=2, num_kv_heads=2, dtype="float16")
    build = rt.build_engine(model, dims={"num_blocks": (2, 32, 128), "num_tokens": (1, 8, 16)})
    assert build.aliased_plugin_io
    assert build.outputs["k_codes_out"] == ["int8", [-1, 16, 2, 32]]
    assert build.outputs["v_norms_out"] == ["float", [-1, 16, 2]]
    assert build.profile["k_codes"][2] == [128, 16, 2, 32]


def test_exported_decode_model_engine_builds(trt, tmp_path):
    from tq_deploy.export import export_model
    from tq_deploy.reference.model import TQModelConfig

    config = TQModelConfig(hidden_size=96, num_q_heads=6, num_kv_heads=2, head_dim=16, k_bits=3, v_bits=2,
                           block_size=8, num_blocks=12, max_blocks_per_seq=4)
    path = tmp_path / "decode.onnx"
    export_model(config, path)
    stage = rt.tensorrt_stage(path, tmp_path / "out")
    assert stage["status"] == "built", stage
    assert (tmp_path / "out" / "decode.engine").stat().st_size == stage["engine_bytes"]
    assert stage["outputs"]["out"] == ["float", [-1, 96]]
    assert stage["outputs"]["k_codes_out"] == ["int8", [-1, 8, 2, ops.packed_size(16, 3)]]


def _with_attr(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    for attr in model.graph.node[0].attribute:
        if attr.name == name:
            if attr.type == onnx.AttributeProto.INT:
                attr.i = value
            else:
                attr.f = value
    return model


def test_invalid_attribute_is_refused(trt):
    model = _with_attr(make_op_model("TQEncode", head_dim=64, bits=2), "bits", 7)
    with pytest.raises(RuntimeError, match="parser failed|build_serialized_network failed"):
        rt.build_engine(model)


def test_inconsistent_packed_size_is_refused(trt):
    # k_codes declared with 3-bit rows while k_bits says 4: configurePlugin must refuse.
    model = make_op_model("TQPagedAttention", head_dim=64, k_bits=3, v_bits=3, num_q_heads=4, num_kv_heads=2)
    _with_attr(model, "k_bits", 4)
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(
        __import__("numpy").linspace(-1, 1, 16, dtype="float32"), "k_codebook"))
    with pytest.raises(RuntimeError, match="build_serialized_network failed|parser failed"):
        rt.build_engine(model)


def test_profile_needs_ranges_for_unknown_dims():
    model = make_op_model("TQEncode", head_dim=16, bits=2, leading_dims=("tokens",))
    with pytest.raises(ValueError, match="'tokens'"):
        rt.profile_shapes(model)
    assert rt.profile_shapes(model, {"tokens": (1, 2, 3)}) == {"x": ((1, 16), (2, 16), (3, 16))}


def test_retype_keeps_the_original_model():
    model = make_op_model("TQDecode", head_dim=16, bits=2)
    retyped = rt.retype_codes_for_tensorrt(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert retyped.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT8


def test_stage_reports_a_missing_plugin_library(trt, tmp_path, monkeypatch):
    path = tmp_path / "enc.onnx"
    onnx.save(make_op_model("TQEncode", head_dim=16, bits=2), path)
    monkeypatch.setenv("TQ_DEPLOY_TRT_LIBRARY", str(tmp_path / "nowhere.so"))
    stage = rt.tensorrt_stage(path, tmp_path / "out")
    assert stage["status"] == "skipped"
    assert "nowhere.so" in stage["reason"]
    assert not (tmp_path / "out" / "enc.engine").exists()


def test_engine_verb_exports_builds_and_reports(trt, tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tq_deploy.cli", "engine", "--out", str(tmp_path), "--op", "TQPagedAttention",
                           "--bits", "2", "--head-dim", "40", "--num-q-heads", "4", "--num-kv-heads", "2",
                           "--dim", "batch=1,2,8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "engine_report.json").read_text())
    assert report["status"] == "built" and report["profile"]["query"] == [[1, 4, 40], [2, 4, 40], [8, 4, 40]]
    assert (tmp_path / "TQPagedAttention.engine").stat().st_size == report["engine_bytes"]
