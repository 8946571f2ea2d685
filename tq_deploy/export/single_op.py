"""One-node ONNX models of each TurboQuant op, for backend tests and benchmarks.

``make_op_model("TQEncode", bits=3, head_dim=128)`` returns a model whose only
node is the custom op; its rotation and codebook(s) are initializers (so the
.onnx is self-describing) and every other input is a graph input. Shapes come
from the op's spec in :mod:`tq_deploy.ops`, with these dimensions:

    D, P, Pk, Pv, K   concrete, from head_dim and the bit widths
    B                 concrete block_size
    Hq, Hkv           concrete when num_q_heads/num_kv_heads are given, else symbolic
    "..."             leading_dims (default one dynamic axis "n")
    N, S, T, M        dynamic: "num_blocks", "batch", "num_tokens", "max_blocks"
    S+1               "batch+1" (TQPagedPrefill's query_start), one more than "batch"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from tq_deploy import abi, ops
from tq_deploy.export import common
from tq_deploy.export.schemas import elem_type, offset_symbol, register_schemas

DYNAMIC_AXES = {"N": "num_blocks", "S": "batch", "T": "num_tokens", "M": "max_blocks"}
_INITIALIZER_INPUTS = ("rotation", "codebook", "k_codebook", "v_codebook")


def _bits_of(spec: ops.OpSpec, bits, k_bits, v_bits) -> dict:
    names = {a.name for a in spec.attributes}
    if "bits" in names:
        if bits is None:
            raise ValueError(f"{spec.name}: bits=None, expected one of {ops.SUPPORTED_BITS}")
        return {"bits": bits}
    k_bits = bits if k_bits is None else k_bits
    v_bits = bits if v_bits is None else v_bits
    if k_bits is None or v_bits is None:
        raise ValueError(f"{spec.name}: k_bits={k_bits}, v_bits={v_bits}, expected bits or both k_bits and v_bits")
    return {"k_bits": k_bits, "v_bits": v_bits}


def _codebook_arrays(spec: ops.OpSpec, codebooks, head_dim: int, bit_attrs: dict) -> dict[str, np.ndarray]:
    """Codebook initializers by input name; None draws the Lloyd-Max codebooks."""
    names = [t.name for t in spec.inputs if t.name in _INITIALIZER_INPUTS[1:]]
    bits_for = {"codebook": "bits", "k_codebook": "k_bits", "v_codebook": "v_bits"}
    if codebooks is None:
        from tq_deploy.reference.codebook import lloyd_max_codebook

        given = {n: lloyd_max_codebook(head_dim, bit_attrs[bits_for[n]]) for n in names}
    elif isinstance(codebooks, Mapping):
        given = dict(codebooks)
    elif not isinstance(codebooks, (list, tuple)) or (len(names) == 1 and len(codebooks) != 1):
        given = {names[0]: codebooks} if len(names) == 1 else {}  # one array (tensor or list of floats)
    else:
        if len(codebooks) != len(names):
            raise ValueError(f"{spec.name}: got {len(codebooks)} codebooks, expected {len(names)} ({names})")
        given = dict(zip(names, codebooks))
    if sorted(given) != sorted(names):
        raise ValueError(f"{spec.name}: codebooks named {sorted(given)}, expected {sorted(names)}")
    out = {}
    for name in names:
        array = common.to_numpy(name, given[name])
        size = 2 ** bit_attrs[bits_for[name]]
        if array.shape != (size,):
            raise ValueError(f"{spec.name}: {name}.shape={array.shape}, expected ({size},) for "
                             f"{bits_for[name]}={bit_attrs[bits_for[name]]}")
        if np.any(np.diff(array) <= 0):
            raise ValueError(f"{spec.name}: {name}={array.tolist()}, expected strictly ascending centroids")
        out[name] = array
    return out


def _key_mean_arrays(spec: ops.OpSpec, key_mean, rope_inv_freq, head_dim: int,
                     num_kv_heads: int | None) -> dict[str, np.ndarray]:
    names = [t.name for t in spec.inputs if t.optional]
    if names != ["key_mean", "rope_inv_freq"]:
        raise ValueError(f"{spec.name}: key_mean is given, expected an attention op (TQPagedAttention, TQPagedPrefill)")
    if key_mean is None or rope_inv_freq is None:
        missing = "key_mean" if key_mean is None else "rope_inv_freq"
        raise ValueError(f"{spec.name}: {missing}=None beside the other, expected both or neither")
    mean = common.to_numpy("key_mean", key_mean)
    rates = common.to_numpy("rope_inv_freq", rope_inv_freq)
    hkv = mean.shape[0] if mean.ndim == 2 else None
    if mean.ndim != 2 or mean.shape[1] != head_dim or (num_kv_heads is not None and hkv != num_kv_heads):
        raise ValueError(f"key_mean.shape={mean.shape}, expected ({num_kv_heads or 'Hkv'}, {head_dim}) "
                         "(num_kv_heads, head_dim)")
    if head_dim % 2 or rates.shape != (head_dim // 2,):
        raise ValueError(f"rope_inv_freq.shape={rates.shape}, expected ({head_dim // 2},) (head_dim / 2, head_dim even)")
    return {"key_mean": mean, "rope_inv_freq": rates}  # finite: common.to_numpy refuses anything else


def _rotation_array(rotation, head_dim: int, rotation_kind: str, seed: int) -> np.ndarray:
    if rotation is None:
        from tq_deploy.reference.rotation import make_rotation

        rotation = make_rotation(head_dim, kind=rotation_kind, seed=seed)
    array = common.to_numpy("rotation", rotation)
    if array.shape != (head_dim, head_dim):
        raise ValueError(f"rotation.shape={array.shape}, expected ({head_dim}, {head_dim})")
    return array


def op_dims(spec: ops.OpSpec, *, head_dim: int, bit_attrs: dict, block_size: int,
            num_q_heads: int | None, num_kv_heads: int | None) -> dict[str, int | str]:
    """Symbol -> concrete size or dynamic axis name, for every symbol the spec uses."""
    dims: dict[str, int | str] = {"D": head_dim, "D/2": head_dim // 2, "B": block_size, **DYNAMIC_AXES}
    dims["Hq"] = num_q_heads if num_q_heads is not None else "num_q_heads"
    dims["Hkv"] = num_kv_heads if num_kv_heads is not None else "num_kv_heads"
    for symbol, bits_name in (("P", "bits"), ("Pk", "k_bits"), ("Pv", "v_bits")):
        if bits_name in bit_attrs:
            dims[symbol] = ops.packed_size(head_dim, bit_attrs[bits_name])
    return dims


def _dim(symbol: str, dims: dict) -> int | str:
    offset = offset_symbol(symbol)
    if offset is None:
        return dims[symbol]
    base, k = offset
    return dims[base] + k if isinstance(dims[base], int) else f"{dims[base]}+{k}"


def _shape(t: ops.TensorSpec, dims: dict, leading: Sequence) -> list:
    shape = []
    for symbol in t.shape:
        if symbol == "...":
            shape.extend(leading)
        else:
            shape.append(_dim(symbol, dims))
    return shape


def make_op_model(
    op_name: str,
    *,
    head_dim: int = 128,
    bits: int | None = None,
    k_bits: int | None = None,
    v_bits: int | None = None,
    rotation=None,
    codebooks=None,
    dtype="float32",
    norm_dtype="float32",
    seed: int = 0,
    rotation_kind: str = "haar",
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    block_size: int = 16,
    leading_dims: Sequence[int | str] = ("n",),
    scale: float = 0.0,
    key_mean=None,
    rope_inv_freq=None,
    check: bool = True,
) -> onnx.ModelProto:
    """A one-node model of ``op_name`` (see the module docstring for its dimensions).

    ``bits`` sets the bit width of TQEncode/TQDecode, or both ``k_bits`` and ``v_bits``
    of the cache ops when those are not given. ``rotation`` ([D, D]) and ``codebooks``
    (one array, a sequence in input order, or a mapping by input name) default to
    the reference's ``make_rotation(head_dim, rotation_kind, seed)`` and Lloyd-Max
    codebooks. ``dtype`` is the float type of x/key/value/query, ``norm_dtype`` that of the paged
    cache's norms (the cache ops' TN). ``key_mean`` ([Hkv, D]) and
    ``rope_inv_freq`` ([D/2]), both or neither, give the attention ops their optional key mean as
    initializers (ops.py); without them the node leaves those inputs out.
    """
    if op_name not in ops.OPS_BY_NAME:
        raise ValueError(f"op_name={op_name!r}, expected one of {sorted(ops.OPS_BY_NAME)}")
    spec = ops.OPS_BY_NAME[op_name]
    dtype = common.check_dtype("dtype", dtype)
    norm_dtype = common.check_dtype("norm_dtype", norm_dtype)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
        raise ValueError(f"head_dim={head_dim!r}, expected an int >= 2")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}, expected an int >= 1")
    if num_q_heads is not None and num_kv_heads is not None and num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")

    bit_attrs = _bits_of(spec, bits, k_bits, v_bits)
    attrs = dict(bit_attrs)
    if any(a.name == "scale" for a in spec.attributes):
        attrs["scale"] = float(scale)
    attrs = spec.resolve_attributes(**attrs)  # checks ranges

    init_arrays = {"rotation": _rotation_array(rotation, head_dim, rotation_kind, seed)}
    init_arrays.update(_codebook_arrays(spec, codebooks, head_dim, bit_attrs))
    if key_mean is not None or rope_inv_freq is not None:
        init_arrays.update(_key_mean_arrays(spec, key_mean, rope_inv_freq, head_dim, num_kv_heads))
        num_kv_heads = int(init_arrays["key_mean"].shape[0])
    present = [t for t in spec.inputs if not t.optional or t.name in init_arrays]
    dims = op_dims(spec, head_dim=head_dim, bit_attrs=bit_attrs, block_size=block_size,
                   num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    param_types = {"T": elem_type(ops.FLOAT16 if dtype == "float16" else ops.FLOAT),
                   "TN": elem_type(ops.FLOAT16 if norm_dtype == "float16" else ops.FLOAT)}

    def type_of(t: ops.TensorSpec) -> int:
        return param_types[t.type_param] if t.type_param else elem_type(t.types[0])

    graph_inputs = [
        helper.make_tensor_value_info(t.name, type_of(t), _shape(t, dims, leading_dims), t.doc)
        for t in present
        if t.name not in init_arrays
    ]
    graph_outputs = [
        helper.make_tensor_value_info(t.name, type_of(t), _shape(t, dims, leading_dims), t.doc)
        for t in spec.outputs
    ]
    node = helper.make_node(spec.name, [t.name for t in present], spec.output_names(), name=spec.name,
                            domain=spec.domain, **attrs)
    initializers = [common.initializer(name, array) for name, array in init_arrays.items()]
    graph = helper.make_graph([node], f"{spec.name}_graph", graph_inputs, graph_outputs, initializers)
    config = {
        "op": spec.name, "head_dim": head_dim, **bit_attrs, "dtype": dtype, "seed": seed,
        **({"norm_dtype": norm_dtype} if abi.has_norm_type(spec) else {}),
        "rotation_kind": rotation_kind if rotation is None else "given",
        "num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "block_size": block_size,
        "leading_dims": list(leading_dims), "scale": attrs.get("scale", 0.0),
        "key_mean": "key_mean" in init_arrays,
    }
    model = common.finish_model(graph, "op", config, doc=spec.doc)
    if check:
        register_schemas()
        onnx.checker.check_model(model, full_check=True)
    return model


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The model's initializers as numpy arrays by name (rotation, codebooks, weights)."""
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
