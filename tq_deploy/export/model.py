"""Export the reference decode step (TQDecodeModel) to ONNX.

Route: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) on a
subclass of :class:`~tq_deploy.reference.model.TQDecodeModel` whose forward
calls the opaque ``tq_export`` custom ops (:mod:`tq_deploy.export.torch_ops`)
for the two TurboQuant steps; a custom translation table turns each into one
"turboquant"-domain node. Everything else (QKV projection, rotary embedding,
output projection) is the reference module's own code, traced by torch.export,
so the graph cannot drift from the reference.

The resulting graph (inputs and outputs in MODEL_INPUT_NAMES / MODEL_OUTPUT_NAMES):

    hidden[S, H] --MatMul(qkv_proj)--> split --> q, k (rotary from positions), v
    k, v, slot_mapping, caches --TQCacheUpdate--> k_codes_out, k_norms_out, v_codes_out, v_norms_out
    q, updated caches, block_tables, context_lens --TQPagedAttention--> attn[S, Hq, D]
    attn --reshape, MatMul(o_proj)--> out[S, H]

rotation, k_codebook, v_codebook and the projection weights are initializers (the weights
transposed, ``qkv_proj.weight.T``: the exporter's Gemm(transB=1) is rewritten as a MatMul).
Dynamic axes: S "batch", M "max_blocks" (block_tables' columns), N "num_blocks".

A config of several layers (``num_layers``, a per-layer bit plan in ``layer_bits``) exports
TQDecodeStack: the graph above once per layer, layer l's output feeding layer l+1, with the
caches ``k_codes.l`` ... -> ``k_codes_out.l`` ... and, for the custom nodes of layer l, the
initializers ``layers.l.rotation``, ``layers.l.k_codebook``, ``layers.l.v_codebook`` and the
attributes ``k_bits``/``v_bits`` of that layer.
"""

from __future__ import annotations

import dataclasses
import os

import onnx
import torch

from tq_deploy.export import common
from tq_deploy.export.schemas import infer_shapes, register_schemas
from tq_deploy.reference.model import (
    MODEL_INPUT_NAMES,
    TQDecodeModel,
    TQDecodeStack,
    TQModelConfig,
    example_inputs,
    model_input_names,
    model_output_names,
)

MODEL_OPSET = 18  # the lowest default-domain opset the torch.export-based exporter emits
DYNAMIC_AXES = {
    "hidden": {0: "batch"},
    "positions": {0: "batch"},
    "slot_mapping": {0: "batch"},
    "block_tables": {0: "batch", 1: "max_blocks"},
    "context_lens": {0: "batch"},
    "k_codes": {0: "num_blocks"},
    "k_norms": {0: "num_blocks"},
    "v_codes": {0: "num_blocks"},
    "v_norms": {0: "num_blocks"},
}


class ExportableDecodeModel(TQDecodeModel):
    """TQDecodeModel whose TurboQuant steps are the opaque ``tq_export`` ops.

    Same parameters and buffers (so initializer names are qkv_proj.weight.T and o_proj.weight.T,
    transposed by _projections_as_matmul, rotation, k_codebook, v_codebook); only the two cache
    steps in forward differ, and they compute the same as the reference.
    """

    def forward(self, hidden, positions, slot_mapping, block_tables, context_lens, k_codes, k_norms, v_codes, v_norms):
        from tq_deploy.export import torch_ops  # noqa: F401  (registers torch.ops.tq_export)

        c = self.config
        q, k, v = self.project_qkv(hidden, positions)
        caches = torch.ops.tq_export.cache_update(k, v, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                                  self.rotation, self.k_codebook, self.v_codebook, c.k_bits, c.v_bits)
        attn = torch.ops.tq_export.paged_attention(q, *caches, block_tables, context_lens, self.rotation,
                                                   self.k_codebook, self.v_codebook, c.k_bits, c.v_bits, 0.0)
        out = self.o_proj(attn.reshape(hidden.shape[0], c.num_q_heads * c.head_dim).to(hidden.dtype))
        return (out, *caches)


def _trace_inputs(config: TQModelConfig) -> tuple:
    """Valid example inputs whose dynamic sizes are >= 2 and pairwise distinct.

    torch.export specializes a dimension whose example size is 0 or 1 and may tie
    dimensions of equal example size, so the trace uses 3 sequences, a block table
    of at least 2 columns and a block count different from both.
    """
    max_blocks = max(config.max_blocks_per_seq, 2)
    if max_blocks == 3:
        max_blocks = 4
    num_blocks = max(config.num_blocks, 3 * max_blocks + 1)
    while num_blocks in (3, max_blocks):
        num_blocks += 1
    trace_config = dataclasses.replace(config, max_blocks_per_seq=max_blocks, num_blocks=num_blocks)
    b = config.block_size
    context_lens = [1, min(b + 1, max_blocks * b), max_blocks * b]
    inputs = example_inputs(trace_config, context_lens, seed=config.seed)
    return tuple(inputs[name] for name in model_input_names(config))


def _axes(config: TQModelConfig) -> dict:
    """Dynamic axes of every graph input and output of ``config``'s model, by name."""
    axes = {}
    for names in (model_input_names(config), model_output_names(config)):
        for name in names:
            base = name.split(".")[0].removesuffix("_out")
            axes[name] = DYNAMIC_AXES.get(base, {0: "batch"} if base == "out" else {})
    return axes


def _dynamic_shapes(config: TQModelConfig):
    named = {}
    axes = _axes(config)
    dims = [{axis: named.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes[name].items()}
            for name in model_input_names(config)]
    if config.num_layers == 1:
        return dict(zip(MODEL_INPUT_NAMES, dims))
    return (*dims[:5], tuple(dims[5:]))  # positional; TQDecodeStack.forward takes the caches as *caches


def export_model(config: TQModelConfig | dict | None = None, path: str | os.PathLike | None = None, *,
                 check: bool = True) -> onnx.ModelProto:
    """Export the decode step of ``config`` (default TQModelConfig()); write it to ``path`` if given.

    The model's ``metadata_props`` hold the config (see :func:`tq_deploy.export.read_metadata`),
    so the reference can be rebuilt from the .onnx alone.
    """
    if config is None:
        config = TQModelConfig()
    elif isinstance(config, dict):
        config = TQModelConfig.from_dict(config)
    elif not isinstance(config, TQModelConfig):
        raise ValueError(f"config is a {type(config).__name__}, expected TQModelConfig, dict or None")
    if config.num_layers == 1:
        module = ExportableDecodeModel(config).eval()
    else:
        module = TQDecodeStack(config, block=ExportableDecodeModel).eval()
    model = common.trace_to_onnx(module, _trace_inputs(config), model_input_names(config),
                                 model_output_names(config), _dynamic_shapes(config), MODEL_OPSET)
    model.doc_string = "TurboQuant decode step: QKV, rotary, TQCacheUpdate, TQPagedAttention, output projection"
    common.set_metadata(model, "model", config.to_dict())
    _name_spec_initializers(model, config)
    _name_dynamic_axes(model, config)
    _projections_as_matmul(model)
    if check:
        register_schemas()
        onnx.checker.check_model(model, full_check=True)
    if path is not None:
        common.save_model(model, path)
    return model


def _projections_as_matmul(model: onnx.ModelProto) -> None:
    """Each projection the exporter wrote as Gemm(x, W, transB=1) (nn.Linear) becomes MatMul(x, W.T)
    with the transposed weight stored as ``<W>.T``: the same product, and on ORT's CUDA EP the
    non-transposed cuBLAS path, the faster one for a decode step's few rows (docs/performance.md)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for index in range(len(model.graph.node)):
        node = model.graph.node[index]
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        if readers.get(node.input[1], 0) > 1:  # a weight read elsewhere too (a tied LM head's embedding) stays
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (attrs.get("transA", 0), attrs.get("transB", 0), attrs.get("alpha", 1.0)) != (0, 1, 1.0):
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            continue
        transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), f"{weight.name}.T")
        model.graph.initializer.remove(weight)
        model.graph.initializer.append(transposed)
        inits[transposed.name] = transposed
        node.CopyFrom(helper.make_node("MatMul", [node.input[0], transposed.name], list(node.output), name=node.name))


def _node_layers(model: onnx.ModelProto, config: TQModelConfig) -> dict[int, int]:
    """Index of each custom node -> its layer: a TQCacheUpdate reads its layer's k_codes input, a
    TQPagedAttention the k_codes its layer's TQCacheUpdate wrote."""
    from tq_deploy import ops

    if config.num_layers == 1:
        return {i: 0 for i, n in enumerate(model.graph.node) if n.domain == ops.DOMAIN}
    layer_of_value = {f"k_codes.{i}": i for i in range(config.num_layers)}
    layers = {}
    for index, node in enumerate(model.graph.node):
        if node.domain != ops.DOMAIN:
            continue
        spec_inputs = [t.name for t in ops.OPS_BY_NAME[node.op_type].inputs]
        source = node.input[spec_inputs.index("k_codes")]
        if source not in layer_of_value:
            raise RuntimeError(f"{node.op_type} node {node.name!r} reads k_codes from {source!r}, "
                               "expected a layer's cache input or its TQCacheUpdate output")
        layers[index] = layer_of_value[source]
        for out in node.output:
            layer_of_value[out] = layers[index]
    return layers


def _name_spec_initializers(model: onnx.ModelProto, config: TQModelConfig) -> None:
    """Feed each custom node's rotation/codebook inputs from initializers named as in the spec.

    The exporter folds equal constants into one initializer (k_codebook == v_codebook when
    k_bits == v_bits); a copy under the spec's name keeps the file self-describing: a reader
    finds "v_codebook" without tracing which initializer the node happens to share. In a stack
    the names carry the layer, as the reference module's buffers do: "layers.3.k_codebook".
    """
    from tq_deploy import ops

    inits = {t.name: t for t in model.graph.initializer}
    layers = _node_layers(model, config)
    for index, node in enumerate(model.graph.node):
        if node.domain != ops.DOMAIN:
            continue
        spec = ops.OPS_BY_NAME[node.op_type]
        prefix = "" if config.num_layers == 1 else f"layers.{layers[index]}."
        for i, t in enumerate(spec.inputs):
            if t.name not in ("rotation", "codebook", "k_codebook", "v_codebook") or i >= len(node.input):
                continue
            source, name = node.input[i], prefix + t.name
            if source == name or source not in inits:
                continue
            if name not in inits:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[source])
                copy.name = name
                model.graph.initializer.append(copy)
                inits[name] = copy
            node.input[i] = name
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:  # the folded originals the renaming left without a reader
        model.graph.initializer.remove(t)


def _name_dynamic_axes(model: onnx.ModelProto, config: TQModelConfig) -> None:
    """Give the graph inputs' and outputs' dynamic dims the names in DYNAMIC_AXES.

    torch.export names dims after the Dim objects already; this makes sure the cache
    outputs carry "num_blocks" too (they inherit the inputs' symbols) and clears
    value_info so that shape inference recomputes it from our schemas.
    """
    axes = _axes(config)
    for value in (*model.graph.input, *model.graph.output):
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if not dim.HasField("dim_value"):
                dim.dim_param = name
    del model.graph.value_info[:]
    inferred = infer_shapes(model)
    model.graph.value_info.extend(inferred.graph.value_info)
