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

import json

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


def save_model(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` whole or not at all (tq_deploy.files)."""
    from tq_deploy import files

    files.write_bytes(path, model.SerializeToString())


def load_model(path) -> onnx.ModelProto:
    """Read an .onnx file; a missing, unreadable or non-ONNX file is a ValueError naming it."""
    import os

    text = os.fspath(path)
    if os.path.isdir(text):
        raise ValueError(f"model {text!r} is a folder, expected an .onnx file")
    if not os.path.isfile(text):
        raise ValueError(f"model {text!r} does not exist, expected an .onnx file")
    try:
        model = onnx.load(text)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends: one message for all
        raise ValueError(f"model {text!r} is not a readable ONNX file ({type(err).__name__}: {err})") from None
    if not model.graph.node and not model.graph.input:
        raise ValueError(f"model {text!r} has an empty graph, expected an ONNX model")
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
    return props[META_KIND], json.loads(props[META_CONFIG])
