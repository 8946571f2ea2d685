"""Export to ONNX with "turboquant"-domain custom ops.

    register_schemas()            ONNX schemas of every op in tq_deploy.ops (idempotent)
    infer_shapes(model)           onnx shape inference with those schemas registered
    make_op_model(op_name, ...)   a one-node model of one op (single_op.py)
    export_model(config, path)    the reference decode model (model.py)
    export_llm(model, path, ...)  a Llama-family checkpoint, whole, with a TurboQuant cache (llm.py)
"""

from tq_deploy.export.common import read_metadata
from tq_deploy.export.schemas import infer_shapes, register_schemas
from tq_deploy.export.single_op import make_op_model


def export_model(config, path=None, **kwargs):
    """See :func:`tq_deploy.export.model.export_model` (imported lazily: it needs torch)."""
    from tq_deploy.export.model import export_model as _export_model

    return _export_model(config, path, **kwargs)


def export_llm(model, path=None, **kwargs):
    """See :func:`tq_deploy.export.llm.export_llm` (imported lazily: it needs torch and transformers)."""
    from tq_deploy.export.llm import export_llm as _export_llm

    return _export_llm(model, path, **kwargs)


__all__ = ["export_llm", "export_model", "infer_shapes", "make_op_model", "read_metadata", "register_schemas"]
