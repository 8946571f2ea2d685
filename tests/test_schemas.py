"""ONNX schemas of the TurboQuant ops: registration, checker, type and shape inference, docs coverage."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, defs, helper
from onnx.shape_inference import InferenceError

from tq_deploy import ops
from tq_deploy.export.schemas import infer_shapes, register_schemas
from tq_deploy.export.single_op import make_op_model

ROOT = Path(__file__).resolve().parent.parent


def dims_of(value: onnx.ValueInfoProto) -> list:
    """Each dim as int (concrete), str (symbolic) or None (unknown)."""
    out = []
    for d in value.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None))
    return out


def strip_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph outputs carry only an element type, so inference must supply the shapes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for out in copy.graph.output:
        out.type.tensor_type.ClearField("shape")
        out.type.tensor_type.elem_type = TensorProto.UNDEFINED
    return copy


def inferred_outputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = infer_shapes(strip_output_shapes(model))
    return {v.name: v for v in inferred.graph.output}


def test_register_schemas_is_idempotent_and_matches_the_specs():
    register_schemas()
    register_schemas()
    for spec in ops.ALL_OPS:
        schema = defs.get_schema(spec.name, spec.version, spec.domain)
        assert [i.name for i in schema.inputs] == spec.input_names()
        assert [o.name for o in schema.outputs] == spec.output_names()
        assert set(schema.attributes) == {a.name for a in spec.attributes}
        for a in spec.attributes:
            assert schema.attributes[a.name].required == (a.default is None)
        for t in spec.inputs + spec.outputs:
            formal = next(p for p in (*schema.inputs, *schema.outputs) if p.name == t.name)
            assert set(formal.types) == set(t.types), t.name
        assert schema.has_type_and_shape_inference_function


@pytest.mark.parametrize("bits", ops.SUPPORTED_BITS)
@pytest.mark.parametrize("head_dim", [64, 100, 128])
def test_encode_decode_shapes_inferred(bits, head_dim):
    enc = make_op_model("TQEncode", bits=bits, head_dim=head_dim, leading_dims=("batch", 3, "tokens"))
    onnx.checker.check_model(enc, full_check=True)
    out = inferred_outputs(enc)
    assert dims_of(out["codes"]) == ["batch", 3, "tokens", ops.packed_size(head_dim, bits)]
    assert out["codes"].type.tensor_type.elem_type == TensorProto.UINT8
    assert dims_of(out["norms"]) == ["batch", 3, "tokens"]
    assert out["norms"].type.tensor_type.elem_type == TensorProto.FLOAT

    dec = make_op_model("TQDecode", bits=bits, head_dim=head_dim, leading_dims=("n",))
    onnx.checker.check_model(dec, full_check=True)
    out = inferred_outputs(dec)
    assert dims_of(out["x_hat"]) == ["n", head_dim]
    assert out["x_hat"].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize("k_bits,v_bits", [(4, 2), (3, 3), (1, 4)])
def test_cache_update_shapes_inferred(k_bits, v_bits):
    model = make_op_model("TQCacheUpdate", k_bits=k_bits, v_bits=v_bits, head_dim=128, num_kv_heads=8,
                          block_size=32, dtype="float16")
    onnx.checker.check_model(model, full_check=True)
    out = inferred_outputs(model)
    assert dims_of(out["k_codes_out"]) == ["num_blocks", 32, 8, ops.packed_size(128, k_bits)]
    assert dims_of(out["v_codes_out"]) == ["num_blocks", 32, 8, ops.packed_size(128, v_bits)]
    assert dims_of(out["k_norms_out"]) == dims_of(out["v_norms_out"]) == ["num_blocks", 32, 8]
    assert out["k_norms_out"].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize("dtype,elem", [("float32", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16)])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (8, 1), (None, None)])
def test_paged_attention_output_follows_query(dtype, elem, heads):
    hq, hkv = heads
    model = make_op_model("TQPagedAttention", k_bits=4, v_bits=3, head_dim=64, num_q_heads=hq, num_kv_heads=hkv,
                          dtype=dtype, scale=0.125)
    onnx.checker.check_model(model, full_check=True)
    out = inferred_outputs(model)["out"]
    assert out.type.tensor_type.elem_type == elem
    assert dims_of(out) == ["batch", hq if hq else "num_q_heads", 64]


@pytest.mark.parametrize("dtype,elem", [("float32", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16)])
def test_paged_prefill_output_follows_query_rows(dtype, elem):
    model = make_op_model("TQPagedPrefill", k_bits=2, v_bits=5, head_dim=128, num_q_heads=12, num_kv_heads=4,
                          block_size=32, dtype=dtype)
    onnx.checker.check_model(model, full_check=True)
    assert dims_of(next(v for v in model.graph.input if v.name == "query_start")) == ["batch+1"]
    out = inferred_outputs(model)["out"]
    assert out.type.tensor_type.elem_type == elem
    assert dims_of(out) == ["num_tokens", 12, 128]


def _with_dims(model: onnx.ModelProto, **sizes) -> onnx.ModelProto:
    """A copy whose named graph inputs have dimension 0 set to a concrete size."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in sizes:
            value.type.tensor_type.shape.dim[0].dim_value = sizes[value.name]
    return copy


def test_paged_prefill_query_start_is_one_longer_than_the_batch():
    model = make_op_model("TQPagedPrefill", bits=4, head_dim=64, num_q_heads=8, num_kv_heads=8)
    infer_shapes(_with_dims(model, block_tables=3, query_start=4))
    infer_shapes(_with_dims(model, query_start=4))  # S follows from S+1
    with pytest.raises(InferenceError, match=r"dimension S of input query_start \(S\+1 = 3\) is 2, expected 3"):
        infer_shapes(_with_dims(model, block_tables=3, query_start=3))
    with pytest.raises(InferenceError, match=r"dimension S of input query_start \(S\+1 = 5\) is 4, expected 2"):
        infer_shapes(_with_dims(model, query_start=5, context_lens=2))
    with pytest.raises(InferenceError, match=r"dimension S\+1 of input query_start is 0, expected >= 1"):
        infer_shapes(_with_dims(model, query_start=0))


def _encode_graph(x_shape, rotation_shape, codes_shape=("n", "p"), bits=3):
    node = helper.make_node("TQEncode", ["x", "rotation", "codebook"], ["codes", "norms"], domain=ops.DOMAIN, bits=bits)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
         helper.make_tensor_value_info("rotation", TensorProto.FLOAT, rotation_shape),
         helper.make_tensor_value_info("codebook", TensorProto.FLOAT, [2**bits])],
        [helper.make_tensor_value_info("codes", TensorProto.UINT8, codes_shape),
         helper.make_tensor_value_info("norms", TensorProto.FLOAT, x_shape[:-1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                             ir_version=10)


def test_head_dim_from_rotation_when_x_is_symbolic():
    model = _encode_graph(["n", "d"], [96, 96])
    out = inferred_outputs(model)
    assert dims_of(out["codes"]) == ["n", ops.packed_size(96, 3)]


def test_unknown_head_dim_leaves_packed_dim_unknown():
    out = inferred_outputs(_encode_graph(["n", "d"], ["d", "d"]))
    n, packed = dims_of(out["codes"])
    # onnx names an unknown dim "unk__<i>"; it must be neither a size nor D itself.
    assert n == "n" and not isinstance(packed, int) and packed != "d"


def test_contradictions_are_inference_errors():
    register_schemas()
    with pytest.raises(InferenceError, match="dimension D"):
        infer_shapes(_encode_graph(["n", 64], [128, 128]))
    with pytest.raises(InferenceError, match="bits=9"):
        infer_shapes(_encode_graph(["n", 64], [64, 64], bits=9))
    with pytest.raises(InferenceError, match="rank"):
        infer_shapes(_encode_graph(["n", 64], [64, 64, 1]))
    # Codes whose last dim disagrees with ceil(D * bits / 8).
    bad = make_op_model("TQDecode", bits=3, head_dim=64)
    bad.graph.input[0].type.tensor_type.shape.dim[-1].dim_value = 25
    with pytest.raises(InferenceError, match="dimension P"):
        infer_shapes(bad)
    # key and value must share the float type T.
    mixed = make_op_model("TQCacheUpdate", bits=2, head_dim=64, num_kv_heads=2)
    mixed.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(Exception, match="value"):
        infer_shapes(mixed)


def test_docs_ops_md_mentions_every_op_input_output_and_attribute():
    text = (ROOT / "docs" / "ops.md").read_text()
    for spec in ops.ALL_OPS:
        assert spec.name in text
        for name in [*spec.input_names(), *spec.output_names(), *(a.name for a in spec.attributes)]:
            assert f"`{name}`" in text, f"docs/ops.md does not mention {spec.name}.{name}"
    for bits in ops.SUPPORTED_BITS:
        assert f"{bits}-bit" in text
