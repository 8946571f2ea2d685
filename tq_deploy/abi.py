"""The native call ABI of each op, derived from :mod:`tq_deploy.ops`.

Every native kernel of an op (CPU, CUDA) takes one C struct, ``tq_<stem>_call``: the op's inputs
and outputs as pointers in the contract's order, the sizes of its symbolic dimensions, its
attributes, the node's float type (and the cache norms' type), and the workspace and stream of a launch. This module says
which fields that struct has, in which order and of which C type; :mod:`tq_deploy.export.op_tables`
writes the C header from it (plugins/common/tq_calls.h) and :mod:`tq_deploy.cuda` builds its
ctypes mirror from it at import, so the two cannot drift apart.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from tq_deploy import ops

# symbolic dimension -> the call's field; P, Pk, Pv, K and S+1 follow from these and the bits
DIM_FIELDS = {"...": "rows", "S": "num_seqs", "T": "num_tokens", "Hq": "num_q_heads", "Hkv": "num_kv_heads",
              "D": "head_dim", "N": "num_blocks", "B": "block_size", "M": "max_blocks"}

_POINTEE = {ops.FLOAT: "float", ops.UINT8: "uint8_t", ops.INT32: "int32_t", ops.INT64: "int64_t"}
_CTYPES = {"int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "float": ctypes.c_float,
           "size_t": ctypes.c_size_t}


@dataclass(frozen=True)
class Field:
    name: str
    c_type: str  # e.g. "const float*", "int64_t"
    role: str  # "input", "output", "dim", "attribute", "dtype", "norm_dtype", "launch"
    index: int = -1  # the input/output/attribute enum index, or the input a dim is read from
    axis: int = 0  # dims: the axis of that input (negative: from the end); rows: trailing axes left out
    doc: str = ""
    source: str = ""  # dims: the input's name

    @property
    def ctype(self):
        return ctypes.c_void_p if self.c_type.endswith("*") else _CTYPES[self.c_type]


def stem(spec: ops.OpSpec) -> str:
    """TQPagedAttention -> paged_attention"""
    name = spec.name[2:]
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


FLOAT_TYPE = "T"  # the node's float type (queries, keys, values, attention output)
NORM_TYPE = "TN"  # the paged cache's norm type


def has_float_type(spec: ops.OpSpec) -> bool:
    return any(t.type_param == FLOAT_TYPE for t in (*spec.inputs, *spec.outputs))


def has_norm_type(spec: ops.OpSpec) -> bool:
    return any(t.type_param == NORM_TYPE for t in (*spec.inputs, *spec.outputs))


def _pointer(t: ops.TensorSpec, const: bool) -> str:
    base = "void" if t.type_param else _POINTEE[t.types[0]]
    return f"{'const ' if const else ''}{base}*"


def _dims(spec: ops.OpSpec) -> list[Field]:
    """One field per symbolic dimension, read from the first input that shows it."""
    seen: dict[str, Field] = {}
    for i, t in enumerate(spec.inputs):
        lead = t.shape.index("...") if "..." in t.shape else -1
        for axis, symbol in enumerate(t.shape):
            if symbol not in DIM_FIELDS or DIM_FIELDS[symbol] in seen:
                continue
            if symbol == "...":
                where = len(t.shape) - 1 - axis  # rows: the product of all but these trailing axes
            else:
                where = axis - len(t.shape) if lead >= 0 else axis
            seen[DIM_FIELDS[symbol]] = Field(DIM_FIELDS[symbol], "int64_t", "dim", i, where,
                                             f"{symbol} of {t.name}", t.name)
    return list(seen.values())


@functools.lru_cache(maxsize=None)
def call_fields(spec: ops.OpSpec) -> tuple[Field, ...]:
    """The fields of ``tq_<stem>_call``, in order."""
    fields = [Field(t.name, _pointer(t, True), "input", i,
                    doc=f"[{', '.join(t.shape)}]" + (", null when left out" if t.optional else ""))
              for i, t in enumerate(spec.inputs)]
    fields += [Field(t.name, _pointer(t, False), "output", i, doc=f"[{', '.join(t.shape)}]")
               for i, t in enumerate(spec.outputs)]
    fields += _dims(spec)
    fields += [Field(a.name, "int32_t" if a.kind == "int" else "float", "attribute", i, doc=a.doc)
               for i, a in enumerate(spec.attributes)]
    if has_float_type(spec):
        fields.append(Field("dtype", "int32_t", "dtype", doc="tq_dtype of the T tensors"))
    if has_norm_type(spec):
        fields.append(Field("norm_dtype", "int32_t", "norm_dtype", doc="tq_dtype of the TN tensors (cache norms)"))
    fields += [Field("workspace", "void*", "launch", doc="device scratch (CUDA)"),
               Field("workspace_bytes", "size_t", "launch"),
               Field("stream", "void*", "launch", doc="cudaStream_t (CUDA)")]
    return tuple(fields)


def inplace_pairs(spec: ops.OpSpec) -> tuple[tuple[int, int], ...]:
    """(input, output) index pairs where output ``<x>_out`` updates input ``<x>`` in place."""
    names = spec.input_names()
    return tuple((names.index(t.name[:-4]), o) for o, t in enumerate(spec.outputs)
                 if t.name.endswith("_out") and t.name[:-4] in names)


@functools.lru_cache(maxsize=None)
def ctypes_struct(spec: ops.OpSpec) -> type[ctypes.Structure]:
    """The ctypes mirror of ``tq_<stem>_call`` (same fields, same order, same C types)."""
    return type(f"{stem(spec)}_call", (ctypes.Structure,),
                {"_fields_": [(f.name, f.ctype) for f in call_fields(spec)]})
