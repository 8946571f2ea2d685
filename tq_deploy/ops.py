"""The op contract: one spec per TurboQuant custom op.

This module is the single source of truth for the custom ONNX ops. The ONNX
schemas (:mod:`tq_deploy.export.schemas`), the exporter, the ONNX Runtime and
TensorRT backends' tests and docs/ops.md all read these specs; nothing else
spells out an op's inputs, outputs or attributes.

Shapes use symbolic dimensions:
    D  head dimension            P  packed bytes per vector = ceil(D * bits / 8)
    K  codebook size = 2**bits   N  number of cache blocks
    B  block size (tokens/block) S  number of sequences (decode batch)
    T  number of new tokens      M  max blocks per sequence
    Hq query heads; Hkv KV heads (Hq % Hkv == 0)

Numerics shared by every backend (see tq_deploy.reference for the math):
    norm  = ||x||_2 (float32; a float16 cache norm is that value rounded to nearest even)
    y = (Pi x) / norm  (y = 0 where norm == 0; the float32 norm, before any rounding)
    code  = #{ boundaries b_k : b_k < y }  (boundaries are centroid midpoints;
            a value exactly on a boundary takes the lower code)
    x_hat = norm * Pi^T c[code]
Packed codes are a little-endian bit stream: code i of a vector occupies bits
[i*bits, (i+1)*bits) counting from bit 0 of byte 0 (b-bit codes: 8 codes in b bytes).

Beside each spec, two entries name the pieces every backend's tests use (as
"module:function", resolved on first use so this module imports nothing):
``reference`` computes one node's outputs with the PyTorch reference
(:mod:`tq_deploy.validate.reference`), ``make_inputs`` draws valid random
inputs for a one-node model (:mod:`tq_deploy.validate.inputs`). Adding an op
touches this file, one kernel per backend and one registration line per
runtime.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

DOMAIN = "turboquant"
DOMAIN_VERSION = 1
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

FLOAT = "tensor(float)"
FLOAT16 = "tensor(float16)"
UINT8 = "tensor(uint8)"
INT32 = "tensor(int32)"
INT64 = "tensor(int64)"


def packed_size(head_dim: int, bits: int) -> int:
    """Bytes of one packed vector: ceil(head_dim * bits / 8)."""
    return (head_dim * bits + 7) // 8


@dataclass(frozen=True)
class TensorSpec:
    name: str
    types: tuple[str, ...]
    shape: tuple[str, ...]  # symbolic, "..." for any leading dimensions
    doc: str
    type_param: str = ""  # shared ONNX type constraint name: "T" (the node's float type) or "TN" (cache norms)
    optional: bool = False  # a trailing input a node may leave out (native kernels see a null pointer)


@dataclass(frozen=True)
class AttrSpec:
    name: str
    kind: str  # "int" or "float"
    default: float | int | None  # None: required
    allowed: tuple | None  # allowed values, or None
    doc: str
    min_value: float | None = None

    def check(self, value, op: str) -> None:
        """Raise ValueError naming the op, attribute, value seen and value expected."""
        if self.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{op}: attribute {self.name}={value!r}, expected an int")
        if self.kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or not math.isfinite(value)):
            raise ValueError(f"{op}: attribute {self.name}={value!r}, expected a finite float")
        if self.allowed is not None and value not in self.allowed:
            raise ValueError(f"{op}: attribute {self.name}={value!r}, expected one of {self.allowed}")
        if self.min_value is not None and value < self.min_value:
            raise ValueError(f"{op}: attribute {self.name}={value!r}, expected >= {self.min_value}")


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...] = field(default_factory=tuple)
    reference: str = ""  # "module:function" (config, initializers, inputs) -> outputs by name
    make_inputs: str = ""  # "module:function" (config, initializers, generator, **options) -> inputs by name
    domain: str = DOMAIN
    version: int = DOMAIN_VERSION

    def entry(self, kind: str):
        """The function an entry (``"reference"`` or ``"make_inputs"``) names."""
        module, _, name = getattr(self, kind).partition(":")
        return getattr(importlib.import_module(module), name)

    def bit_attributes(self) -> tuple[str, ...]:
        """Names of the attributes that are bit widths (``bits``, or ``k_bits`` and ``v_bits``)."""
        return tuple(a.name for a in self.attributes if a.allowed == SUPPORTED_BITS)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def required_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs every node has (the optional ones trail them)."""
        return tuple(t for t in self.inputs if not t.optional)

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def attribute(self, name: str) -> AttrSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no attribute {name!r}")

    def resolve_attributes(self, **given) -> dict:
        """Fill defaults and check ranges; unknown names are an error."""
        names = {a.name for a in self.attributes}
        unknown = set(given) - names
        if unknown:
            raise ValueError(f"{self.name}: unknown attributes {sorted(unknown)}, expected a subset of {sorted(names)}")
        out = {}
        for a in self.attributes:
            value = given.get(a.name, a.default)
            if value is None:
                raise ValueError(f"{self.name}: attribute {a.name} is required")
            a.check(value, self.name)
            out[a.name] = value
        return out


def _bits_attr(name: str, what: str) -> AttrSpec:
    return AttrSpec(name, "int", None, SUPPORTED_BITS, f"bits per code of {what}; codebook has 2**{name} entries")


ROTATION = TensorSpec("rotation", (FLOAT,), ("D", "D"), "orthogonal rotation Pi (y = Pi x), float32")


def _codebook(name: str = "codebook", what: str = "") -> TensorSpec:
    return TensorSpec(name, (FLOAT,), ("K",), f"Lloyd-Max centroids{what}, ascending, float32")


ENCODE = OpSpec(
    name="TQEncode",
    doc="Quantize vectors: norm, rotate, nearest centroid per coordinate, pack.",
    inputs=(
        TensorSpec("x", (FLOAT, FLOAT16), ("...", "D"), "vectors to encode", "T"),
        ROTATION,
        _codebook(),
    ),
    outputs=(
        TensorSpec("codes", (UINT8,), ("...", "P"), "packed codes"),
        TensorSpec("norms", (FLOAT,), ("...",), "L2 norm of each input vector"),
    ),
    attributes=(_bits_attr("bits", "the codes"),),
    reference="tq_deploy.validate.reference:encode_node",
    make_inputs="tq_deploy.validate.inputs:encode_inputs",
)

DECODE = OpSpec(
    name="TQDecode",
    doc="Reconstruct vectors: unpack, look up centroids, rotate back, scale by norm.",
    inputs=(
        TensorSpec("codes", (UINT8,), ("...", "P"), "packed codes"),
        TensorSpec("norms", (FLOAT,), ("...",), "vector norms"),
        ROTATION,
        _codebook(),
    ),
    outputs=(TensorSpec("x_hat", (FLOAT,), ("...", "D"), "reconstructed vectors"),),
    attributes=(_bits_attr("bits", "the codes"),),
    reference="tq_deploy.validate.reference:decode_node",
    make_inputs="tq_deploy.validate.inputs:decode_inputs",
)

# The paged cache's norms are float32 or float16 (type parameter TN, one type per node): float16
# saves 16/D bits per cached coordinate, and its rounding (2**-11 relative) is far below a code's
# error at any width. A norm that rounds past float16's largest finite value (65504, i.e. from 65520
# on) is stored as +inf, which the attention turns into NaN scores, never a silent clamp.
_CACHE_INPUTS = (
    TensorSpec("k_codes", (UINT8,), ("N", "B", "Hkv", "Pk"), "paged key codes"),
    TensorSpec("k_norms", (FLOAT, FLOAT16), ("N", "B", "Hkv"), "paged key norms", "TN"),
    TensorSpec("v_codes", (UINT8,), ("N", "B", "Hkv", "Pv"), "paged value codes"),
    TensorSpec("v_norms", (FLOAT, FLOAT16), ("N", "B", "Hkv"), "paged value norms", "TN"),
)

CACHE_UPDATE = OpSpec(
    name="TQCacheUpdate",
    doc=(
        "Encode new keys and values into their paged slots. slot = block * B + offset; "
        "a negative slot skips that token (padding); when several tokens name one slot the last one is kept. "
        "Outputs are the updated caches (written in place where the runtime aliases them, else a copy)."
    ),
    inputs=(
        TensorSpec("key", (FLOAT, FLOAT16), ("T", "Hkv", "D"), "new keys", "T"),
        TensorSpec("value", (FLOAT, FLOAT16), ("T", "Hkv", "D"), "new values", "T"),
        TensorSpec("slot_mapping", (INT64,), ("T",), "cache slot of each new token, -1 to skip"),
        *_CACHE_INPUTS,
        ROTATION,
        _codebook("k_codebook", " for keys"),
        _codebook("v_codebook", " for values"),
    ),
    outputs=tuple(
        TensorSpec(f"{t.name}_out", t.types, t.shape, f"updated {t.doc}", t.type_param) for t in _CACHE_INPUTS
    ),
    attributes=(_bits_attr("k_bits", "keys"), _bits_attr("v_bits", "values")),
    reference="tq_deploy.validate.reference:cache_update_node",
    make_inputs="tq_deploy.validate.inputs:cache_update_inputs",
)

# The key mean: a cache may hold its keys without a fixed per-KV-head mean mu taken before RoPE
# (the key at position t >= 1 is stored as k_t - R_t mu; position 0 as it is). Centred keys
# quantize with a third of the loss on models whose keys share large channels; the attention
# adds the mean back exactly, per score, which no graph-level rewrite can (R_t mu changes with t).
_KEY_MEAN_INPUTS = (
    TensorSpec("key_mean", (FLOAT,), ("Hkv", "D"),
               "optional, with rope_inv_freq: the mean key mu (before RoPE) that the cached keys at "
               "positions t >= 1 are stored without", optional=True),
    TensorSpec("rope_inv_freq", (FLOAT,), ("D/2",),
               "optional, with key_mean: the RoPE rates w; R_t turns the pair (j, j + D/2) by the angle "
               "t * w_j (a float32 product)", optional=True),
)
_KEY_MEAN_DOC = (
    " With key_mean and rope_inv_freq, the score of a cached token at position t >= 1 (its index in its "
    "sequence) adds q . R_t mu before the scale: sum_j A_j cos(t w_j) + B_j sin(t w_j) with "
    "A_j = q_j mu_j + q_j' mu_j', B_j = q_j' mu_j - q_j mu_j', j' = j + D/2, mu the query head's KV head's mean."
)

PAGED_ATTENTION = OpSpec(
    name="TQPagedAttention",
    doc=(
        "Decode attention over a TurboQuant paged cache, in the rotated domain: "
        "q_rot = Pi q; s_i = ||k_i|| <q_rot, c_k[idx_k_i]> * scale; p = softmax(s) over "
        "the first context_lens[s] tokens; out = Pi^T sum_i p_i ||v_i|| c_v[idx_v_i]. "
        "Query head h reads KV head h // (Hq / Hkv). context_lens 0 gives zeros; a NaN or overflowing score "
        "gives NaN, never zeros." + _KEY_MEAN_DOC
    ),
    inputs=(
        TensorSpec("query", (FLOAT, FLOAT16), ("S", "Hq", "D"), "one query token per sequence", "T"),
        *_CACHE_INPUTS,
        TensorSpec("block_tables", (INT32,), ("S", "M"), "cache block of each logical block"),
        TensorSpec("context_lens", (INT32,), ("S",), "tokens in each sequence's cache"),
        ROTATION,
        _codebook("k_codebook", " for keys"),
        _codebook("v_codebook", " for values"),
        *_KEY_MEAN_INPUTS,
    ),
    outputs=(TensorSpec("out", (FLOAT, FLOAT16), ("S", "Hq", "D"), "attention output", "T"),),
    attributes=(
        _bits_attr("k_bits", "keys"),
        _bits_attr("v_bits", "values"),
        AttrSpec("scale", "float", 0.0, None, "softmax scale, finite; 0 means 1/sqrt(D)", min_value=0.0),
    ),
    reference="tq_deploy.validate.reference:paged_attention_node",
    make_inputs="tq_deploy.validate.inputs:paged_attention_inputs",
)

PAGED_PREFILL = OpSpec(
    name="TQPagedPrefill",
    doc=(
        "Multi-token causal attention over a TurboQuant paged cache (chunked prefill; a decode step is the "
        "case of one token per sequence). The new tokens of all sequences are packed along T: sequence s owns "
        "query rows query_start[s] .. query_start[s+1]-1, which are the last n_s = query_start[s+1] - "
        "query_start[s] tokens of its context of context_lens[s] tokens (their keys and values already in the "
        "cache). Row j of sequence s sits at position p = context_lens[s] - n_s + j and attends to the cache "
        "tokens 0..p of that sequence, in the rotated domain as TQPagedAttention does. query_start is "
        "non-decreasing from 0 to T with n_s <= context_lens[s]." + _KEY_MEAN_DOC
    ),
    inputs=(
        TensorSpec("query", (FLOAT, FLOAT16), ("T", "Hq", "D"), "new query tokens of all sequences, packed", "T"),
        *_CACHE_INPUTS,
        TensorSpec("block_tables", (INT32,), ("S", "M"), "cache block of each logical block"),
        TensorSpec("context_lens", (INT32,), ("S",), "tokens in each sequence's cache, its new tokens included"),
        TensorSpec("query_start", (INT32,), ("S+1",), "first query row of each sequence, then T"),
        ROTATION,
        _codebook("k_codebook", " for keys"),
        _codebook("v_codebook", " for values"),
        *_KEY_MEAN_INPUTS,
    ),
    outputs=(TensorSpec("out", (FLOAT, FLOAT16), ("T", "Hq", "D"), "attention output per query row", "T"),),
    attributes=PAGED_ATTENTION.attributes,
    reference="tq_deploy.validate.reference:paged_prefill_node",
    make_inputs="tq_deploy.validate.inputs:paged_prefill_inputs",
)

ALL_OPS: tuple[OpSpec, ...] = (ENCODE, DECODE, CACHE_UPDATE, PAGED_ATTENTION, PAGED_PREFILL)
OPS_BY_NAME = {op.name: op for op in ALL_OPS}


def default_scale(head_dim: int, scale: float = 0.0) -> float:
    """The softmax scale an op uses: ``scale`` if positive, else 1/sqrt(head_dim)."""
    return scale if scale > 0 else 1.0 / math.sqrt(head_dim)
