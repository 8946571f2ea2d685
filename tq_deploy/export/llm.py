"""Export a Llama-family checkpoint with a TurboQuant KV cache to ONNX (``tq-deploy export --model``).

The graph is the reference decoder (:mod:`tq_deploy.reference.llama`) traced by
``torch.onnx.export(dynamo=True)``, its two cache steps the opaque ``tq_export`` ops that the
translation table turns into one "turboquant" node each, as for the synthetic decode step
(:mod:`tq_deploy.export.model`):

    input_ids --Gather(embed_tokens)--> h
    per layer l: RMSNorm, q/k/v MatMul (+bias), rotary from positions,
                 TQCacheUpdate(k, v, slot_mapping, k_codes.l ...) -> k_codes_out.l ...
                 TQPagedPrefill(q, k_codes_out.l ..., block_tables, context_lens, query_start) -> attn
                 o_proj, residual, RMSNorm, SwiGLU MLP, residual
    Gather(logits_index), final RMSNorm, LM head (Gemm on the embedding when tied) -> logits [R, V] float32

Inputs and outputs are those of the exported LLM's interface (``input_names`` / ``output_names`` of
the reference). Dynamic dims: "num_tokens" (T), "batch" (S), "batch+1" (query_start), "max_blocks"
(M), "num_blocks" (N), "logit_rows" (R). The weights are initializers in float32 or float16 (the
rotations and codebooks stay float32); past 2 GB they go to ``<out>.data`` beside the model.
The metadata (kind "llm") holds the decoder config, the checkpoint's architecture, its
end-of-sequence ids, the weights' dtype and the tokenizer's source.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import torch

from tq_deploy.export import common
from tq_deploy.export.model import MODEL_OPSET, _name_spec_initializers, _projections_as_matmul
from tq_deploy.export.schemas import infer_shapes, register_schemas

LLM_KIND = "llm"
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # a protobuf message stops at 2 GiB; leave room for the graph
STEP_AXES = {
    "input_ids": {0: "num_tokens"},
    "positions": {0: "num_tokens"},
    "slot_mapping": {0: "num_tokens"},
    "query_start": {0: "batch+1"},
    "block_tables": {0: "batch", 1: "max_blocks"},
    "context_lens": {0: "batch"},
    "logits_index": {0: "logit_rows"},
}


class ExportOps:
    """The decoder's cache steps as the opaque ops that export to one "turboquant" node each."""

    @staticmethod
    def cache_update(*args):
        return torch.ops.tq_export.cache_update(*args)

    @staticmethod
    def paged_prefill(*args):
        return torch.ops.tq_export.paged_prefill(*args)


def axes(config) -> dict:
    """Dynamic axes of every graph input and output, by name."""
    from tq_deploy.reference.llama import input_names, output_names

    out = dict(STEP_AXES)
    for name in (*input_names(config)[len(STEP_AXES):], *output_names(config)[1:]):
        out[name] = {0: "num_blocks"}
    out["logits"] = {0: "logit_rows"}
    return out


def _trace_inputs(config) -> tuple:
    """Valid inputs whose dynamic sizes are >= 2 and pairwise distinct (torch.export specializes sizes 0
    and 1 and may tie equal ones): S = 2 sequences (query_start 3), T = 7 tokens, M = 4 table columns,
    R = 5 logit rows, N = 11 blocks."""
    from tq_deploy.reference.llama import allocate_caches, step_inputs

    b = config.block_size
    tables = torch.tensor([[3, 1, 0, 0], [7, 2, 9, 4]], dtype=torch.int32)
    inputs = step_inputs([[1, 2, 3], [4, 5, 6, 7]], [b + 1, 0], tables, b, all_logits=True)
    inputs["logits_index"] = torch.tensor([0, 2, 3, 5, 6], dtype=torch.int64)
    return (*inputs.values(), *allocate_caches(config, 11))


def _dynamic_shapes(config):
    dims = {}

    def dim(name):
        if name == "batch+1":
            return dim("batch") + 1
        return dims.setdefault(name, torch.export.Dim(name.replace("+", "_")))

    spec = axes(config)
    from tq_deploy.reference.llama import input_names

    names = input_names(config)
    shapes = [{axis: dim(n) for axis, n in spec[name].items()} for name in names]
    return (*shapes[:len(STEP_AXES)], tuple(shapes[len(STEP_AXES):]))


def export_decoder(decoder, metadata: dict, path=None, *, check: bool = True,
                   external_data: bool | None = None) -> onnx.ModelProto:
    """Export a LlamaDecoder (its weights in their dtype) with ``metadata`` (kind "llm"); write it to ``path``.

    ``external_data``: weights in ``<path>.data`` (None: when the model passes 2 GB)."""
    from tq_deploy.reference.llama import input_names, output_names

    config = decoder.config
    if config.cache != "turboquant":
        raise ValueError(f"decoder cache={config.cache!r}, expected 'turboquant' (the float32 cache is the "
                         "reference's check, not a deployable model)")
    attention = [layer.self_attn for layer in decoder.layers]
    reference_ops = [a.ops for a in attention]
    for a in attention:  # the decoder itself is traced, its cache steps swapped for the opaque ops
        a.ops = ExportOps
    try:
        model = common.trace_to_onnx(decoder.eval(), _trace_inputs(config), input_names(config), output_names(config),
                                     _dynamic_shapes(config), MODEL_OPSET, optimize=False)
    finally:
        for a, ops in zip(attention, reference_ops):
            a.ops = ops
    model.doc_string = ("Llama-family decoder with a TurboQuant paged KV cache: embeddings, per layer RMSNorm, "
                        "q/k/v, rotary, TQCacheUpdate, TQPagedPrefill, o_proj, SwiGLU MLP; final norm, LM head")
    common.set_metadata(model, LLM_KIND, metadata)
    _name_spec_initializers(model, config)
    _projections_as_matmul(model)
    _name_dims(model, config)
    register_schemas()
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if external_data is None:
        external_data = size > EXTERNAL_DATA_BYTES
    if check and not external_data:
        onnx.checker.check_model(model, full_check=True)
    if path is not None:
        save(model, path, external_data)
        if check and external_data:
            onnx.checker.check_model(os.fspath(path), full_check=True)
    return model


def _name_dims(model: onnx.ModelProto, config) -> None:
    """The interface's names on the inputs' and outputs' dynamic dims (the trace names them after its Dim
    objects: "batch + 1" or a fresh symbol for the cache outputs), then shape inference with our schemas."""
    spec = axes(config)
    for value in (*model.graph.input, *model.graph.output):
        for axis, name in spec.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if not dim.HasField("dim_value"):
                dim.dim_param = name
    del model.graph.value_info[:]
    model.graph.value_info.extend(infer_shapes(_without_weights(model)).graph.value_info)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape: shape inference needs
    their shapes only (the small ones keep their values: Reshape targets), and skips copying the weights."""
    from onnx import helper

    light = onnx.ModelProto()
    light.CopyFrom(model)
    big = [t for t in light.graph.initializer if len(t.raw_data) > 4096]
    for t in big:
        light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    keep = [t for t in light.graph.initializer if len(t.raw_data) <= 4096]
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    return light


def save(model: onnx.ModelProto, path, external_data: bool) -> None:
    """Write ``model`` whole or not at all; with ``external_data`` its initializers go to ``<path>.data``."""
    if not external_data:
        common.save_model(model, path)
        return
    target = Path(path)
    data_name = target.name + ".data"
    folder = target.parent if str(target.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=folder) as tmp:
        onnx.save_model(model, os.path.join(tmp, target.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(os.path.join(tmp, data_name), folder / data_name)  # the data first: the model names it
        os.replace(os.path.join(tmp, target.name), target)


def metadata_of(loaded, dtype: str) -> dict:
    """The metadata config of an exported checkpoint: the decoder config and what a runtime needs beside it."""
    hf = loaded.hf_config
    eos = getattr(hf, "eos_token_id", None)
    return {
        **loaded.config.to_dict(),
        "architecture": loaded.architecture,
        "dtype": dtype,
        "tokenizer": loaded.source.tokenizer_source,
        "bos_token_id": getattr(hf, "bos_token_id", None),
        "eos_token_id": eos,
    }


def decoder_config_of(metadata: dict):
    """The reference decoder's config from an exported LLM's metadata config (the keys beside it, such as
    the tokenizer and dtype, are left out)."""
    from tq_deploy.reference.llama import DecoderConfig

    return DecoderConfig.from_dict({k: v for k, v in metadata.items() if k in DecoderConfig.__dataclass_fields__})


def export_llm(model: str, path=None, *, k_bits: int = 4, v_bits: int = 4, layer_bits=None, plan=None,
               block_size: int = 16, seed: int = 0, rotation: str = "haar", dtype: str = "float32",
               key_mean: str | None = None, norm_dtype: str = "float32", check: bool = True,
               external_data: bool | None = None, what: str = "--model") -> onnx.ModelProto:
    """``tq-deploy export --model``: load ``model`` (name, folder or GGUF), export it with the TurboQuant
    cache of the given widths, write ``path`` if given (with external data, the returned model then
    refers to ``<path>.data`` for its weights).

    Widths: ``k_bits``/``v_bits`` for every layer, ``layer_bits`` (one (k, v) pair per layer) or ``plan``
    (a :class:`~tq_deploy.presets.BitPlan`, checked against the model's layers and head_dim before the
    weights load). ``key_mean``: calibrate a per-layer key mean (ops.py) on ``"generated"`` (the model's
    own samples), a shipped text name or a text file, and store the keys without it; None: none.
    ``norm_dtype``: the cache's norms, "float32" or "float16" (ops.py: TN)."""
    from tq_deploy.models.checkpoint import decoder_config, load_decoder, load_hf_config, resolve_source

    dtype = common.check_dtype("--dtype", dtype)
    options = dict(k_bits=k_bits, v_bits=v_bits, layer_bits=layer_bits, block_size=block_size, seed=seed,
                   rotation=rotation, norm_dtype=norm_dtype)
    if plan is not None:
        if layer_bits is not None:
            raise ValueError("plan and layer_bits given, expected one of them")
        shape = decoder_config(load_hf_config(resolve_source(model, what), what), what)
        if plan.num_layers != shape.num_layers:
            raise ValueError(f"--plan has {plan.num_layers} layers, expected {shape.num_layers} (the layers of "
                             f"{what}={model!r})")
        if plan.head_dim != shape.head_dim:
            raise ValueError(f"--plan was calibrated for head_dim={plan.head_dim}, expected {shape.head_dim} (the "
                             f"head_dim of {what}={model!r})")
        options["layer_bits"] = tuple(plan.layers)
    if key_mean is not None:
        options["key_mean"] = True
    loaded = load_decoder(model, what, **options)
    metadata = metadata_of(loaded, dtype)
    if key_mean is not None:
        calibrate_key_mean(loaded, key_mean)
        metadata["key_mean_calibration"] = key_mean
    decoder = loaded.model.cast_weights(getattr(torch, dtype))
    return export_decoder(decoder, metadata, path, check=check, external_data=external_data)


def calibrate_key_mean(loaded, source: str) -> None:
    """Measure the key mean of ``loaded``'s decoder (built with key_mean=True) on ``source`` and set it."""
    from tq_deploy.models.checkpoint import load_tokenizer
    from tq_deploy.models.key_mean import calibration_tokens, measure_key_mean, set_key_mean
    from tq_deploy.models.kv_transform import float_cache_copy

    tokenizer = None if source == "generated" else load_tokenizer(loaded.source.tokenizer_source)
    plain = float_cache_copy(loaded.model)  # one copy for the sampling and the measuring
    texts = calibration_tokens(plain, source, first_token=getattr(loaded.hf_config, "bos_token_id", None),
                               tokenizer=tokenizer)
    set_key_mean(loaded.model, measure_key_mean(plain, texts))
