"""ONNX export: the decode model and single-op models (structure, initializers, axes, metadata, docs sync)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from tq_deploy import ops
from tq_deploy.export import export_model, infer_shapes, make_op_model, read_metadata
from tq_deploy.export.common import IR_VERSION
from tq_deploy.export.model import DYNAMIC_AXES
from tq_deploy.export.op_tables import HEADER_COMMAND, NATIVE_FILES, splice
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.model import MODEL_INPUT_NAMES, MODEL_OUTPUT_NAMES, TQDecodeModel, TQModelConfig
from tq_deploy.reference.packing import pack_codes
from tq_deploy.reference.rotation import make_rotation

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "default": TQModelConfig(),
    "mixed-bits-mqa": TQModelConfig(hidden_size=96, num_q_heads=4, num_kv_heads=1, head_dim=128, k_bits=3, v_bits=2,
                                    block_size=8, num_blocks=20, max_blocks_per_seq=6, seed=5, rotation="hadamard"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    config = CONFIGS[request.param]
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    model = export_model(config, path)
    return config, model, path


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def initializers(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_saved_file_passes_the_full_checker(exported):
    config, model, path = exported
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.ir_version == IR_VERSION <= 13
    assert {o.domain: o.version for o in loaded.opset_import} == {"": 18, ops.DOMAIN: ops.DOMAIN_VERSION}


def test_custom_nodes_and_their_wiring(exported):
    config, model, _ = exported
    custom = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert [n.op_type for n in custom] == ["TQCacheUpdate", "TQPagedAttention"]
    update, attention = custom
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs == {"k_bits": config.k_bits, "v_bits": config.v_bits, "scale": 0.0}
    assert {a.name: a.i for a in update.attribute} == {"k_bits": config.k_bits, "v_bits": config.v_bits}
    # The cache update reads the graph's cache inputs and the attention reads the updated caches.
    assert list(update.input[3:7]) == list(MODEL_INPUT_NAMES[5:])
    assert list(attention.input[1:5]) == list(update.output)
    assert list(update.output) == list(MODEL_OUTPUT_NAMES[1:])
    assert list(attention.input[5:7]) == ["block_tables", "context_lens"]
    for node in custom:
        assert list(node.input[-3:]) == ["rotation", "k_codebook", "v_codebook"]


def test_initializers_are_the_reference_tensors(exported):
    config, model, _ = exported
    inits = initializers(model)
    reference = TQDecodeModel(config).state_dict()
    np.testing.assert_array_equal(inits["rotation"], make_rotation(config.head_dim, config.rotation, config.seed).numpy())
    np.testing.assert_array_equal(inits["k_codebook"], lloyd_max_codebook(config.head_dim, config.k_bits).numpy())
    np.testing.assert_array_equal(inits["v_codebook"], lloyd_max_codebook(config.head_dim, config.v_bits).numpy())
    for name in ("rotation", "k_codebook", "v_codebook"):
        np.testing.assert_array_equal(inits[name], reference[name].numpy(), err_msg=name)
    for name in ("qkv_proj.weight", "o_proj.weight"):  # MatMul(x, W.T): the projections stored transposed
        np.testing.assert_array_equal(inits[f"{name}.T"], reference[name].numpy().T, err_msg=name)
    assert not [n for n in model.graph.node if n.op_type == "Gemm"]
    assert inits["k_codebook"].shape == (2**config.k_bits,) and inits["v_codebook"].shape == (2**config.v_bits,)


def test_graph_io_names_types_and_dynamic_axes(exported):
    config, model, _ = exported
    c = config
    pk, pv = ops.packed_size(c.head_dim, c.k_bits), ops.packed_size(c.head_dim, c.v_bits)
    expected_inputs = {
        "hidden": (TensorProto.FLOAT, ["batch", c.hidden_size]),
        "positions": (TensorProto.INT64, ["batch"]),
        "slot_mapping": (TensorProto.INT64, ["batch"]),
        "block_tables": (TensorProto.INT32, ["batch", "max_blocks"]),
        "context_lens": (TensorProto.INT32, ["batch"]),
        "k_codes": (TensorProto.UINT8, ["num_blocks", c.block_size, c.num_kv_heads, pk]),
        "k_norms": (TensorProto.FLOAT, ["num_blocks", c.block_size, c.num_kv_heads]),
        "v_codes": (TensorProto.UINT8, ["num_blocks", c.block_size, c.num_kv_heads, pv]),
        "v_norms": (TensorProto.FLOAT, ["num_blocks", c.block_size, c.num_kv_heads]),
    }
    got = {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in model.graph.input}
    assert got == expected_inputs
    outputs = {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in model.graph.output}
    assert list(outputs) == list(MODEL_OUTPUT_NAMES)
    assert outputs["out"] == (TensorProto.FLOAT, ["batch", c.hidden_size])
    for out_name, in_name in zip(MODEL_OUTPUT_NAMES[1:], MODEL_INPUT_NAMES[5:]):
        assert outputs[out_name] == expected_inputs[in_name]
    assert set(DYNAMIC_AXES) == set(MODEL_INPUT_NAMES)


def test_shape_inference_types_every_value(exported):
    _, model, _ = exported
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    for out in bare.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = infer_shapes(bare)
    shaped = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    for node in inferred.graph.node:
        for name in node.output:
            assert name in shaped and shaped[name].type.tensor_type.HasField("shape"), f"{node.op_type} -> {name}"
    original = {v.name: dims(v) for v in model.graph.output}
    got = {v.name: dims(v) for v in inferred.graph.output}
    # onnx's own Reshape inference turns "batch" into a fresh symbol behind the -1 in
    # [-1, Hq*D]; our ops keep every cache dim exactly.
    assert isinstance(got["out"][0], str) and got["out"][1:] == original["out"][1:]
    assert {k: v for k, v in got.items() if k != "out"} == {k: v for k, v in original.items() if k != "out"}


def test_metadata_rebuilds_the_config(exported):
    config, _, path = exported
    kind, stored = read_metadata(str(path))
    assert kind == "model"
    assert TQModelConfig.from_dict(stored) == config


def test_export_rejects_a_bad_config():
    with pytest.raises(ValueError, match="config is a str"):
        export_model("big")


@pytest.mark.parametrize("op_name", [op.name for op in ops.ALL_OPS])
@pytest.mark.parametrize("bits", ops.SUPPORTED_BITS)
def test_single_op_model(op_name, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    head_dim = int(torch.randint(2, 160, (1,), generator=gen))
    rotation = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))[0].float()
    model = make_op_model(op_name, bits=bits, head_dim=head_dim, rotation=rotation, num_kv_heads=2,
                          num_q_heads=6, block_size=4)
    spec = ops.OPS_BY_NAME[op_name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION
    assert {o.domain: o.version for o in model.opset_import} == {"": 17, ops.DOMAIN: 1}
    (node,) = model.graph.node
    assert (node.op_type, node.domain) == (op_name, ops.DOMAIN)
    required = [t.name for t in spec.required_inputs()]  # the optional inputs are left out
    assert list(node.input) == required and list(node.output) == spec.output_names()
    inits = initializers(model)
    np.testing.assert_array_equal(inits["rotation"], rotation.numpy())
    books = [n for n in inits if "codebook" in n]
    assert sorted(books) == sorted(t.name for t in spec.inputs if "codebook" in t.name)
    for name in books:
        np.testing.assert_array_equal(inits[name], lloyd_max_codebook(head_dim, bits).numpy())
    assert {v.name for v in model.graph.input} == set(required) - set(inits)
    all_dims = {d for v in (*model.graph.input, *model.graph.output) for d in dims(v) if isinstance(d, str)}
    assert all_dims <= {"n", "num_blocks", "batch", "batch+1", "num_tokens", "max_blocks"}
    kind, config = read_metadata(model)
    assert kind == "op" and config["op"] == op_name and config["head_dim"] == head_dim


def test_single_op_errors_name_the_argument():
    with pytest.raises(ValueError, match="op_name='TQFoo'"):
        make_op_model("TQFoo", bits=2)
    with pytest.raises(ValueError, match="bits=9"):
        make_op_model("TQEncode", bits=9, head_dim=16)
    with pytest.raises(ValueError, match=r"codebook.shape=\(4,\), expected \(8,\)"):
        make_op_model("TQEncode", bits=3, head_dim=16, codebooks=torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="strictly ascending"):
        make_op_model("TQDecode", bits=1, head_dim=16, codebooks=[torch.tensor([0.5, -0.5])])
    with pytest.raises(ValueError, match=r"rotation.shape=\(8, 8\), expected \(16, 16\)"):
        make_op_model("TQDecode", bits=1, head_dim=16, rotation=torch.eye(8))
    with pytest.raises(ValueError, match="num_q_heads=6 is not a multiple of num_kv_heads=4"):
        make_op_model("TQPagedAttention", bits=2, head_dim=16, num_q_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        make_op_model("TQEncode", bits=2, head_dim=16, dtype="bfloat16")


def test_docs_tables_in_sync_with_ops_py():
    text = (ROOT / "docs" / "ops.md").read_text()
    assert splice(text) == text, "docs/ops.md is stale: python -m tq_deploy.export.op_tables --write docs/ops.md"


@pytest.mark.parametrize("name", sorted(NATIVE_FILES))
def test_the_generated_native_headers_are_current(name):
    header = Path(__file__).resolve().parents[1] / "plugins" / "common" / name
    assert header.read_text() == NATIVE_FILES[name](), f"{header} is stale: {HEADER_COMMAND}"


@pytest.mark.parametrize("bits,codes", [
    (1, [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]),
    (2, [1, 2, 3, 0, 0, 3, 2, 1]),
    (3, [5, 3, 7, 0, 6, 1, 2, 4]),
    (3, [5, 3, 7]),
    (4, [10, 3, 15, 0]),
    (5, [17, 3, 30, 0, 9, 21, 12, 31]),
    (6, [45, 2, 63, 16]),
    (7, [100, 5, 127, 64, 1, 77, 33, 90]),
    (8, [200, 7, 255, 16]),
])
def test_docs_worked_packing_examples(bits, codes):
    text = (ROOT / "docs" / "ops.md").read_text()
    packed = pack_codes(torch.tensor(codes, dtype=torch.uint8), bits).tolist()
    shown = " ".join(f"{b:02x}" for b in packed)
    # Each example's bytes appear in the doc, as hex pairs or per byte.
    assert shown in text or all(f"{b:02x}`" in text or f"0x{b:02x}`" in text for b in packed), (bits, codes, shown)


class _PrefillStep(torch.nn.Module):
    """The smallest module that calls the prefill torch op, as a real model's attention would."""

    def __init__(self, config: dict, inits: dict):
        super().__init__()
        self.config = config
        for name in ("rotation", "k_codebook", "v_codebook"):
            self.register_buffer(name, inits[name])

    def forward(self, query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start):
        from tq_deploy.export import torch_ops  # noqa: F401  (registers torch.ops.tq_export)

        c = self.config
        return torch.ops.tq_export.paged_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables,
                                                 context_lens, query_start, self.rotation, self.k_codebook,
                                                 self.v_codebook, c["k_bits"], c["v_bits"], 0.5)


def test_prefill_torch_op_exports_as_one_node(seed):
    """torch.ops.tq_export.paged_prefill: its eager body is the reference, and the dynamo exporter
    turns it into one TQPagedPrefill node whose query_start is one longer than the batch."""
    from tq_deploy.export.torch_ops import translation_table
    from tq_deploy.validate.inputs import model_initializers, random_inputs
    from tq_deploy.validate.reference import reference_outputs

    op_model = make_op_model("TQPagedPrefill", head_dim=32, k_bits=3, v_bits=2, num_q_heads=4, num_kv_heads=2,
                             block_size=8, scale=0.5)
    inputs = random_inputs(op_model, seed=seed)
    names = [v.name for v in op_model.graph.input]
    module = _PrefillStep(read_metadata(op_model)[1], model_initializers(op_model)).eval()
    expected = reference_outputs(op_model, inputs)["out"]
    torch.testing.assert_close(module(*(inputs[n] for n in names)), expected, rtol=0, atol=0)

    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("num_tokens")
    blocks, width = torch.export.Dim("num_blocks"), torch.export.Dim("max_blocks")
    shapes = {"query": {0: tokens}, "k_codes": {0: blocks}, "k_norms": {0: blocks}, "v_codes": {0: blocks},
              "v_norms": {0: blocks}, "block_tables": {0: batch, 1: width}, "context_lens": {0: batch},
              "query_start": {0: batch + 1}}
    program = torch.onnx.export(module, tuple(inputs[n] for n in names), dynamo=True, input_names=names,
                                output_names=["out"], dynamic_shapes=shapes, custom_translation_table=translation_table(),
                                external_data=False, verbose=False)
    model = program.model_proto
    (node,) = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert node.op_type == "TQPagedPrefill"
    assert list(node.input[:8]) == names
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k_bits": 3, "v_bits": 2, "scale": 0.5}
    graph_inputs = {v.name: dims(v) for v in model.graph.input}
    assert graph_inputs["query_start"][0] != graph_inputs["context_lens"][0]
    assert isinstance(graph_inputs["query_start"][0], str)
