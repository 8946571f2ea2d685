"""ONNX schemas for the TurboQuant custom ops, built from :mod:`tq_deploy.ops`.

``register_schemas()`` turns every :class:`~tq_deploy.ops.OpSpec` into an
``onnx.defs.OpSchema`` (inputs, outputs, type constraints, attributes) and
registers it, so that ``onnx.checker.check_model(..., full_check=True)`` and
``onnx.shape_inference.infer_shapes`` accept "turboquant"-domain nodes.

Type and shape inference is generic: it reads the spec's symbolic shapes.
Each input's dimensions bind the spec's symbols (``D``, ``N``, ``Hkv``, ...;
``"..."`` binds any leading dimensions); the derived symbols follow from the
attributes (``P = ceil(D * bits / 8)``, ``Pk``/``Pv`` with ``k_bits``/``v_bits``,
``K = 2**bits``); a dimension written ``X+k`` (``query_start``'s ``S+1``) binds ``X`` to its size
minus ``k`` when that size is concrete, and says nothing about ``X`` when it is symbolic; each
output's shape is then spelled from its spec. A symbol
that two inputs bind to different concrete sizes is an ``InferenceError``
naming the op, the symbol and both sizes. Outputs whose spec shares a type
parameter with an input (``"T"``) take that input's element type.
"""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto, defs, helper
from onnx.shape_inference import InferenceError

from tq_deploy import ops

_ELEM_TYPE = {
    ops.FLOAT: TensorProto.FLOAT,
    ops.FLOAT16: TensorProto.FLOAT16,
    ops.UINT8: TensorProto.UINT8,
    ops.INT32: TensorProto.INT32,
    ops.INT64: TensorProto.INT64,
}

def elem_type(type_str: str) -> int:
    """ONNX element type of a spec type string such as ``"tensor(float)"``."""
    return _ELEM_TYPE[type_str]


def _type_str(spec: ops.TensorSpec, constraint_of: dict[str, str]) -> str:
    if spec.type_param:
        return spec.type_param
    if len(spec.types) == 1:
        return spec.types[0]
    # A multi-type tensor without a shared parameter gets its own constraint.
    constraint_of[spec.name] = f"T_{spec.name}"
    return constraint_of[spec.name]


def _attribute(spec: ops.AttrSpec) -> defs.OpSchema.Attribute:
    kind = {"int": defs.OpSchema.AttrType.INT, "float": defs.OpSchema.AttrType.FLOAT}[spec.kind]
    doc = spec.doc
    if spec.allowed is not None:
        doc += f" (one of {list(spec.allowed)})"
    if spec.min_value is not None:
        doc += f" (>= {spec.min_value})"
    if spec.default is None:
        return defs.OpSchema.Attribute(spec.name, kind, doc, required=True)
    return defs.OpSchema.Attribute(spec.name, helper.make_attribute(spec.name, spec.default), doc)


def build_schema(spec: ops.OpSpec) -> defs.OpSchema:
    """The ``OpSchema`` of one op spec, with its inference function attached."""
    params: dict[str, tuple[str, ...]] = {}
    own_constraints: dict[str, str] = {}
    formal_in, formal_out = [], []
    for tensors, formal in ((spec.inputs, formal_in), (spec.outputs, formal_out)):
        for t in tensors:
            type_str = _type_str(t, own_constraints)
            if t.type_param:
                seen = params.setdefault(t.type_param, t.types)
                if seen != t.types:
                    raise ValueError(f"{spec.name}: type parameter {t.type_param} has types {t.types}, expected {seen}")
            elif t.name in own_constraints:
                params[own_constraints[t.name]] = t.types
            option = (defs.OpSchema.FormalParameterOption.Optional if t.optional
                      else defs.OpSchema.FormalParameterOption.Single)
            formal.append(defs.OpSchema.FormalParameter(t.name, type_str, t.doc, param_option=option))
    schema = defs.OpSchema(
        spec.name,
        spec.domain,
        spec.version,
        spec.doc,
        inputs=formal_in,
        outputs=formal_out,
        type_constraints=[(name, list(types), "") for name, types in params.items()],
        attributes=[_attribute(a) for a in spec.attributes],
    )
    schema.set_type_and_shape_inference_function(lambda ctx: _infer(spec, ctx))
    return schema


def register_schemas() -> None:
    """Register every op of :data:`tq_deploy.ops.ALL_OPS`; safe to call again."""
    for spec in ops.ALL_OPS:
        if _registered(spec):
            continue
        defs.register_schema(build_schema(spec))


def _registered(spec: ops.OpSpec) -> bool:
    try:
        schema = defs.get_schema(spec.name, spec.version, spec.domain)
    except defs.SchemaError:
        return False
    return schema.since_version == spec.version


def infer_shapes(model: onnx.ModelProto, strict: bool = True) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (with data propagation, so Reshape targets computed
    from Shape keep symbolic dims) after registering our schemas."""
    register_schemas()
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=True)


# --- inference -------------------------------------------------------------


class _Bindings:
    """Symbol -> dimension, preferring concrete sizes over names."""

    def __init__(self, op: str):
        self.op = op
        self.dims: dict[str, onnx.TensorShapeProto.Dimension] = {}
        self.leading: list[onnx.TensorShapeProto.Dimension] | None = None

    def bind(self, symbol: str, dim: onnx.TensorShapeProto.Dimension, where: str) -> None:
        old = self.dims.get(symbol)
        if old is None or (not old.HasField("dim_value") and dim.HasField("dim_value")):
            self.dims[symbol] = dim
            return
        if old.HasField("dim_value") and dim.HasField("dim_value") and old.dim_value != dim.dim_value:
            raise InferenceError(
                f"{self.op}: dimension {symbol} of {where} is {dim.dim_value}, expected {old.dim_value}"
            )

    def expect(self, symbol: str, value: int, formula: str) -> None:
        """Bind a derived symbol; an input that already gave it another size is the error."""
        old = self.concrete(symbol)
        if old is not None and old != value:
            raise InferenceError(f"{self.op}: dimension {symbol} is {old}, expected {formula} = {value}")
        self.dims[symbol] = _concrete_dim(value)

    def concrete(self, symbol: str) -> int | None:
        dim = self.dims.get(symbol)
        return dim.dim_value if dim is not None and dim.HasField("dim_value") else None


def _attr_value(ctx, spec: ops.OpSpec, name: str):
    attr = ctx.get_attribute(name)
    if attr is None:
        return spec.attribute(name).default
    return helper.get_attribute_value(attr)


def _concrete_dim(value: int) -> onnx.TensorShapeProto.Dimension:
    dim = onnx.TensorShapeProto.Dimension()
    dim.dim_value = value
    return dim


def _infer(spec: ops.OpSpec, ctx) -> None:
    attrs = {}
    for a in spec.attributes:
        value = _attr_value(ctx, spec, a.name)
        if value is None:
            raise InferenceError(f"{spec.name}: attribute {a.name} is required")
        try:
            a.check(value, spec.name)
        except ValueError as err:
            raise InferenceError(str(err)) from None
        attrs[a.name] = value

    bound = _Bindings(spec.name)
    param_type: dict[str, int] = {}
    for i, t in enumerate(spec.inputs):
        if i >= ctx.get_num_inputs() or not ctx.has_input(i):
            continue
        tensor_type = ctx.get_input_type(i)
        if tensor_type is None or not tensor_type.HasField("tensor_type"):
            continue
        tt = tensor_type.tensor_type
        if t.type_param and tt.elem_type:
            seen = param_type.setdefault(t.type_param, tt.elem_type)
            if seen != tt.elem_type:
                raise InferenceError(
                    f"{spec.name}: input {t.name} has element type {TensorProto.DataType.Name(tt.elem_type)}, "
                    f"expected {TensorProto.DataType.Name(seen)} like the other {t.type_param} inputs"
                )
        if not tt.HasField("shape"):
            continue
        dims = list(tt.shape.dim)
        named = [s for s in t.shape if s != "..."]
        if "..." in t.shape:
            if len(dims) < len(named):
                raise InferenceError(f"{spec.name}: input {t.name} has rank {len(dims)}, expected >= {len(named)}")
            lead, dims = dims[: len(dims) - len(named)], dims[len(dims) - len(named):]
            if bound.leading is None:
                bound.leading = lead
        elif len(dims) != len(named):
            raise InferenceError(f"{spec.name}: input {t.name} has rank {len(dims)}, expected {len(named)} {t.shape}")
        for symbol, dim in zip(named, dims):
            offset = offset_symbol(symbol)
            if offset is not None:
                _bind_offset(bound, offset, dim, t.name, symbol)
            elif dim.HasField("dim_value") or dim.HasField("dim_param"):
                bound.bind(_symbol(t, symbol), dim, f"input {t.name}")

    _bind_derived(attrs, bound)

    for i, t in enumerate(spec.outputs):
        if i >= ctx.get_num_outputs() or not ctx.has_output(i):
            continue
        out = onnx.TypeProto()
        if t.type_param:
            elem = param_type.get(t.type_param)
        else:
            elem = elem_type(t.types[0])
        if elem:
            out.tensor_type.elem_type = elem
        shape = _output_shape(t, bound)
        if shape is not None:
            out.tensor_type.shape.dim.extend(shape)
            if not shape:
                out.tensor_type.shape.SetInParent()  # rank-0 output
        ctx.set_output_type(i, out)


_OFFSET = re.compile(r"^([A-Za-z]\w*)\+(\d+)$")


def offset_symbol(symbol: str) -> tuple[str, int] | None:
    """``"S+1"`` -> ``("S", 1)``; None for a plain symbol."""
    match = _OFFSET.match(symbol)
    return (match.group(1), int(match.group(2))) if match else None


def _bind_offset(bound: _Bindings, offset: tuple[str, int], dim, name: str, symbol: str) -> None:
    """A concrete size of an ``X+k`` dimension binds ``X``; a symbolic one cannot be split."""
    if not dim.HasField("dim_value"):
        return
    base, k = offset
    if dim.dim_value < k:
        raise InferenceError(f"{bound.op}: dimension {symbol} of input {name} is {dim.dim_value}, expected >= {k}")
    bound.bind(base, _concrete_dim(dim.dim_value - k), f"input {name} ({symbol} = {dim.dim_value})")


def _symbol(t: ops.TensorSpec, symbol: str) -> str:
    """The spec writes every codebook's size as ``K``; keys and values may differ in bits."""
    if symbol == "K" and t.name in ("k_codebook", "v_codebook"):
        return "K" + t.name[0]
    return symbol


# Derived symbols: name -> (bits attribute, function of (D, bits)).
_DERIVED = {
    "P": ("bits", lambda d, b: ops.packed_size(d, b)),
    "Pk": ("k_bits", lambda d, b: ops.packed_size(d, b)),
    "Pv": ("v_bits", lambda d, b: ops.packed_size(d, b)),
    "K": ("bits", lambda d, b: 2**b),
    "Kk": ("k_bits", lambda d, b: 2**b),
    "Kv": ("v_bits", lambda d, b: 2**b),
}


def _bind_derived(attrs: dict, bound: _Bindings) -> None:
    """Bind P/Pk/Pv from D and the bit widths and K/Kk/Kv from the bit widths (checks what inputs bound)."""
    head_dim = bound.concrete("D")
    for symbol, (bits_name, rule) in _DERIVED.items():
        if bits_name not in attrs or (symbol.startswith("P") and head_dim is None):
            continue
        bits = attrs[bits_name]
        formula = (f"ceil(D * {bits_name} / 8) with D={head_dim}, {bits_name}={bits}" if symbol.startswith("P")
                   else f"2**{bits_name} with {bits_name}={bits}")
        bound.expect(symbol, rule(head_dim, bits), formula)


def _output_shape(t: ops.TensorSpec, bound: _Bindings):
    dims = []
    for symbol in t.shape:
        if symbol == "...":
            if bound.leading is None:
                return None  # unknown rank
            dims.extend(bound.leading)
            continue
        offset = offset_symbol(symbol)
        if offset is not None:
            base = bound.concrete(offset[0])
            dims.append(_concrete_dim(base + offset[1]) if base is not None else onnx.TensorShapeProto.Dimension())
            continue
        dim = bound.dims.get(_symbol(t, symbol))
        dims.append(dim if dim is not None else onnx.TensorShapeProto.Dimension())
    return dims
