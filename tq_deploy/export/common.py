"""Pieces shared by the single-op and whole-model exporters.

IR version: onnx 1.23 writes IR 14 by default, but onnxruntime 1.30 reads at
most IR 13, so every model we write says IR 10 (ONNX 1.16), which all
supported runtimes read. Opsets: the default domain at 17 (LayerNormalization
and everything the model graph uses exist there) and "turboquant" at the
version of :mod:`tq_deploy.ops`.

The exporter's settings (the whole config) are stored as JSON in the model's
``metadata_props`` so that ``tq-deploy run`` and ``pipeline`` can rebuild the
reference and make valid inputs from the .onnx alone.
"""

from __future__ import annotations

import contextlib
import json
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tq_deploy import ops

IR_VERSION = 10
DEFAULT_OPSET = 17
PRODUCER = "tq-deploy"

META_KIND = "tq_deploy.kind"  # "op" or "model"
META_CONFIG = "tq_deploy.config"  # JSON of the exporter's settings
META_OP_VERSION = "tq_deploy.op_contract"  # "<domain>:<version>"

DTYPES = {"float32": np.float32, "float16": np.float16}


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)]


def check_dtype(name: str, dtype) -> str:
    """Normalize a float dtype given as a string, numpy or torch dtype to "float32"/"float16"."""
    text = str(dtype).replace("torch.", "")
    text = {"float": "float32", "half": "float16"}.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"{name}={dtype!r}, expected one of {tuple(DTYPES)}")
    return text


def to_numpy(name: str, value, dtype=np.float32) -> np.ndarray:
    """A torch tensor or array-like as a contiguous numpy array of ``dtype``."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(value), dtype=dtype)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values, expected finite numbers")
    return array


def initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def finish_model(graph: onnx.GraphProto, kind: str, config: dict, doc: str = "") -> onnx.ModelProto:
    """Wrap ``graph`` in a model with our IR version, opsets and metadata."""
    model = helper.make_model(graph, opset_imports=opset_imports(), ir_version=IR_VERSION,
                              producer_name=PRODUCER, doc_string=doc)
    set_metadata(model, kind, config)
    return model


def set_metadata(model: onnx.ModelProto, kind: str, config: dict) -> None:
    props = {
        META_KIND: kind,
        META_CONFIG: json.dumps(config, sort_keys=True),
        META_OP_VERSION: f"{ops.DOMAIN}:{ops.DOMAIN_VERSION}",
    }
    helper.set_model_props(model, props)


def trace_to_onnx(module, inputs: tuple, input_names, output_names, dynamic_shapes, opset: int,
                  optimize: bool = True) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` of ``module`` with the TurboQuant ops translated to custom nodes
    (tq_deploy.export.torch_ops), weights inline, the exporter's chatter silenced; its IR version
    capped at :data:`IR_VERSION`, its trace notes dropped, producer set. ``optimize``: the exporter's
    own graph cleanup (else a single round of onnxscript's optimizer runs after)."""
    import warnings

    import torch

    from tq_deploy.export.torch_ops import translation_table

    with warnings.catch_warnings(), quiet_loggers("torch.onnx", "torch.export", "torch._export", "onnxscript"), \
            torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's chatter (torchvision absent, deprecations) is noise here
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=translation_table(),
                                    external_data=False, optimize=optimize, verbose=False)
    if not optimize:
        import onnxscript.optimizer

        # one round: a second finds next to nothing in these graphs and doubles the time
        onnxscript.optimizer.optimize_ir(program.model, num_iterations=1)
    model = program.model_proto
    if model.ir_version > IR_VERSION:
        model.ir_version = IR_VERSION  # onnxruntime 1.30 reads at most IR 13
    model.producer_name = PRODUCER
    drop_trace_metadata(model)
    return model


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """The named loggers at ERROR for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


TRACE_METADATA = ("pkg.torch.", "namespace")


def drop_trace_metadata(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node trace notes (Python stack traces, module paths, FX names): they
    carry the exporting machine's file paths, make the graph ~3x larger and no runtime reads them."""
    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from nodes(attr.g)
                for sub in attr.graphs:
                    yield from nodes(sub)

    every = [*nodes(model.graph), *(n for f in model.functions for n in f.node)]
    for node in every:
        keep = [p for p in node.metadata_props if not p.key.startswith(TRACE_METADATA)]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def save_model(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` whole or not at all (tq_deploy.files)."""
    from tq_deploy import files

    files.write_bytes(path, model.SerializeToString())


def check_wiring(model: onnx.ModelProto, what: str = "model") -> None:
    """Every top-level node reads only names that a graph input, an initializer or an earlier node
    provides, and every graph output is provided: a ValueError naming the first one that is not.
    (TensorRT's parser reports a dangling name as a dozen log lines and an assertion.)"""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    known |= {t.name for t in model.graph.sparse_initializer}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            if name not in known:
                producers = [n.name or n.op_type for n in model.graph.node[index + 1:] if name in n.output]
                source = (f"it is made only by the later node {producers[0]!r} (the nodes are not in order)"
                          if producers else "no graph input, initializer or node provides it")
                raise ValueError(f"{what}: node {node.name or node.op_type!r} ({node.op_type}, number {index}) reads "
                                 f"{name!r}, expected a graph input, initializer or earlier node output: {source}")
        known.update(node.output)
    for output in model.graph.output:
        if output.name not in known:
            raise ValueError(f"{what}: graph output {output.name!r} is made by no node, expected the output of "
                             "a node, a graph input or an initializer")


def load_model(path) -> onnx.ModelProto:
    """Read an .onnx file; a missing, unreadable or non-ONNX file is a ValueError naming it."""
    import os

    text = os.fspath(path)
    from tq_deploy import files

    files.check_input(text, "model", "an .onnx file")
    try:
        model = onnx.load(text)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends: one message for all
        raise ValueError(f"model {text!r} is not a readable ONNX file ({type(err).__name__}: {err})") from None
    if not model.graph.node and not model.graph.input:
        raise ValueError(f"model {text!r} has an empty graph, expected an ONNX model")
    check_wiring(model, f"model {text!r}")
    return model


def read_metadata(model: onnx.ModelProto | str) -> tuple[str, dict]:
    """(kind, config) stored by :func:`set_metadata`; accepts a model or a path."""
    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if META_KIND not in props or META_CONFIG not in props:
        raise ValueError(
            f"model metadata_props has keys {sorted(props)}, expected {META_KIND!r} and {META_CONFIG!r} "
            "(was it exported by tq-deploy?)"
        )
    kind, text = props[META_KIND], props[META_CONFIG]
    if kind not in ("op", "model", "llm"):
        raise ValueError(f"model metadata {META_KIND}={kind!r}, expected 'op', 'model' or 'llm'")
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"model metadata {META_CONFIG} is not JSON ({err}), expected the exporter's config") from None
    if not isinstance(config, dict):
        raise ValueError(f"model metadata {META_CONFIG}={text:.60}, expected a JSON object")
    if kind == "op":
        check_op_config(config)
    return kind, config


# An op model's config (single_op.py): the keys that the inputs, the reference and the checks read.
OP_CONFIG_KEYS = {"op": str, "head_dim": int, "dtype": str, "block_size": int, "leading_dims": list}
KIND_NAMES = {str: "a string", int: "an int", list: "a list"}


def check_op_config(config: dict) -> None:
    """One line for a broken op config, instead of a KeyError or TypeError where it is first read."""
    for key, kind in OP_CONFIG_KEYS.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"model metadata: op config {key}={value!r}, expected {KIND_NAMES[kind]}")
    if config["op"] not in ops.OPS_BY_NAME:
        raise ValueError(f"model metadata: op={config['op']!r}, expected one of {sorted(ops.OPS_BY_NAME)}")
    if config["dtype"] not in DTYPES:
        raise ValueError(f"model metadata: dtype={config['dtype']!r}, expected one of {tuple(DTYPES)}")
    if not 2 <= config["head_dim"] <= 1024 or config["block_size"] < 1:
        raise ValueError(f"model metadata: head_dim={config['head_dim']}, block_size={config['block_size']}, expected "
                         "2 <= head_dim <= 1024 and block_size >= 1")
    for key in (("bits",) if config["op"] in ("TQEncode", "TQDecode") else ("k_bits", "v_bits")):
        if isinstance(config.get(key), bool) or config.get(key) not in ops.SUPPORTED_BITS:
            raise ValueError(f"model metadata: op config {key}={config.get(key)!r}, expected one of "
                             f"{ops.SUPPORTED_BITS}")
