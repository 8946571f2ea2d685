"""Seeded fuzzing of the TurboQuant ops: ONNX Runtime's kernels and the PyTorch API against the reference.

    tq-deploy fuzz --seed 0 --cases 300                      # the CI-sized run (seconds)
    tq-deploy fuzz --seed 7 --cases 100000 --json fuzz.json  # a long run
    tq-deploy fuzz --seed 7 --cases 5000 --device cuda       # also the PyTorch API on CUDA tensors

Case ``i`` of seed ``s`` is drawn from its own generator (``s``, ``i``), so any case can be replayed
alone (``--first i --cases 1``). A case is one op call: random shapes (zero-size dims, head dims
that are not multiples of 8, any block size), attributes and values (NaN, +-inf, zero vectors,
1e20s and 1e-30s, garbage code bytes with padding bits set, block tables whose unused entries
hold junk, negative and repeated slots, NaN norms in unused slots); about a third of the cases
carry one defect that makes the call invalid (a wrong rank, size, dtype, an out-of-range
context length, block-table entry or slot, a bit width outside 1-8, a bad scale, an unknown or
wrongly typed attribute, a descending or NaN codebook).

What a case must do (docs/ops.md, "Bad input"):

* the reference (:mod:`tq_deploy.dispatch` on CPU tensors, i.e. the PyTorch API) returns, or
  raises ``ValueError`` with "expected" in its message: any other exception is an unclear error;
* ONNX Runtime (CPU EP, the project's custom-op library, through
  :func:`tq_deploy.runtime.session.make_session`) refuses exactly the calls the reference refuses,
  with an error naming the op, an input or an attribute, and on every valid call agrees with the
  reference (codes identical except adjacent codes at rounding ties, norms to 2e-6, attention and
  decode to 1e-4 relative per row, the same rows NaN or infinite);
* with ``device="cuda"``, the PyTorch API on CUDA tensors (CUDA/Triton kernels) refuses the same
  metadata errors and agrees with the reference on valid calls (fp16-level tolerances); data it
  cannot check without a synchronization may go unrefused, but must not crash;
* nothing crashes and nothing hangs: cases run in a child process per batch (a segfault or abort
  ends only the child; the batch is then re-run one case per process to name the case), and each
  batch has a timeout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from tq_deploy import ops

OPS = ("TQEncode", "TQDecode", "TQCacheUpdate", "TQPagedAttention")
DIMS = (2, 3, 5, 8, 13, 16, 24, 64, 72, 100, 128)
CACHE = ("k_codes", "k_norms", "v_codes", "v_norms")
# Tolerances of the agreement checks (the reference is the source of truth).
NORM_RTOL = 2e-6
ROW_RTOL = {np.float32: 1e-4, np.float16: 2e-3}
GPU_ROW_RTOL = 3e-2  # fp16/bf16 tensor-core products in the GPU kernels
TIE_TOL = 2e-5  # |y - boundary| under which a code may go either way
GPU_TIE_TOL = 2e-3  # the GPU encode rotates in split fp16 products


@dataclass
class Case:
    """One op call: inputs in contract order, attributes as (value, "int" | "float") pairs."""

    index: int
    op: str
    inputs: dict[str, np.ndarray]
    attrs: dict[str, tuple[float, str]]
    defect: str = ""  # "" for a valid call
    ref_refuses: bool = False  # the defect is one the PyTorch API refuses
    ort_refuses: bool = False  # the defect is one ONNX Runtime (through make_session) refuses
    data_defect: bool = False  # only the data is wrong: GPU backends may skip the check

    def describe(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}:{v.dtype}" for k, v in self.inputs.items())
        attrs = ", ".join(f"{k}={v}({t})" for k, (v, t) in self.attrs.items())
        return f"{self.op}({shapes}; {attrs})" + (f" defect={self.defect}" if self.defect else "")


@dataclass
class Finding:
    case: int
    op: str
    kind: str  # mismatch, unclear-error, accepted-invalid, refused-valid, crash, hang
    detail: str

    def to_dict(self) -> dict:
        return {"case": self.case, "op": self.op, "kind": self.kind, "detail": self.detail}


# ---------------------------------------------------------------------------------------- drawing


def _codebook(rng, dim: int, bits: int) -> np.ndarray:
    """Finite, strictly ascending centroids: any such codebook is valid input (the ops must not
    assume Lloyd-Max ones, whose 8-bit solve also takes seconds). Half spread like the coordinates
    of a unit vector (about 1/sqrt(D)), half over [-1, 1]."""
    spread = 2.0 / math.sqrt(dim) if rng.random() < 0.5 else 1.0
    values = np.sort(rng.uniform(-spread, spread, 2**bits))
    values = values + np.arange(2**bits) * spread * 1e-4  # strictly ascending even where draws coincide
    return values.astype(np.float32)


def _rotation(rng, dim: int) -> np.ndarray:
    if rng.random() < 0.15:  # the ops compute the same formula for any matrix: not checked
        return rng.standard_normal((dim, dim)).astype(np.float32) / math.sqrt(dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _specials(rng, a: np.ndarray, rate: float, values=(np.nan, np.inf, -np.inf, 0.0)) -> np.ndarray:
    """Sprinkle non-finite values and zeros into a float array."""
    if a.size and rng.random() < 0.3:
        mask = rng.random(a.shape) < rate
        a = a.copy()
        a[mask] = rng.choice(values, int(mask.sum()))
    return a


def _vectors(rng, shape, dtype) -> np.ndarray:
    scale = rng.choice([1.0, 1.0, 3.0, 1e-3, 1e20, 1e-30]) if dtype == np.float32 else rng.choice([1.0, 3.0, 1e-3])
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if x.ndim >= 1 and x.shape[-1] and x.size and rng.random() < 0.2:
        x.reshape(-1, x.shape[-1])[0] = 0.0  # a zero vector
    with np.errstate(over="ignore"):
        return _specials(rng, x, 0.02).astype(dtype)


def _bits(rng) -> int:
    return int(rng.integers(1, 9))


def draw_case(seed: int, index: int, op_names=OPS) -> Case:
    """Case ``index`` of ``seed``: valid or with one defect (module docstring)."""
    rng = np.random.default_rng([seed, index])
    op = str(rng.choice(list(op_names)))
    dim = int(rng.choice(DIMS))
    dtype = np.float16 if rng.random() < 0.25 else np.float32
    draw = {"TQEncode": _encode_case, "TQDecode": _decode_case, "TQCacheUpdate": _cache_update_case,
            "TQPagedAttention": _attention_case}[op]
    case = draw(rng, index, dim, dtype)
    if rng.random() < 0.35:
        _add_defect(rng, case)
    return case


def _encode_case(rng, index, dim, dtype) -> Case:
    bits = _bits(rng)
    lead = tuple(int(v) for v in rng.integers(0, 5, size=int(rng.integers(1, 3))))
    return Case(index, "TQEncode", {"x": _vectors(rng, (*lead, dim), dtype), "rotation": _rotation(rng, dim),
                                    "codebook": _codebook(rng, dim, bits)}, {"bits": (bits, "int")})


def _decode_case(rng, index, dim, dtype) -> Case:
    bits = _bits(rng)
    lead = tuple(int(v) for v in rng.integers(0, 5, size=int(rng.integers(1, 3))))
    codes = rng.integers(0, 256, (*lead, ops.packed_size(dim, bits)), dtype=np.uint8)  # padding bits too
    norms = _specials(rng, rng.uniform(0, 4, lead).astype(np.float32), 0.05, (np.nan, np.inf, 0.0, 1e30))
    return Case(index, "TQDecode", {"codes": codes, "norms": norms, "rotation": _rotation(rng, dim),
                                    "codebook": _codebook(rng, dim, bits)}, {"bits": (bits, "int")})


def _random_cache(rng, n, b, hkv, dim, k_bits, v_bits):
    cache = {
        "k_codes": rng.integers(0, 256, (n, b, hkv, ops.packed_size(dim, k_bits)), dtype=np.uint8),
        "k_norms": rng.uniform(0, 3, (n, b, hkv)).astype(np.float32),
        "v_codes": rng.integers(0, 256, (n, b, hkv, ops.packed_size(dim, v_bits)), dtype=np.uint8),
        "v_norms": rng.uniform(0, 3, (n, b, hkv)).astype(np.float32),
    }
    return cache


def _cache_update_case(rng, index, dim, dtype) -> Case:
    k_bits, v_bits = _bits(rng), _bits(rng)
    n, b, hkv, t = int(rng.integers(1, 5)), int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(0, 7))
    slots = rng.integers(-1, n * b, t).astype(np.int64)  # negative: skipped; repeats: the last one wins
    rot = _rotation(rng, dim)
    return Case(index, "TQCacheUpdate", {
        "key": _vectors(rng, (t, hkv, dim), dtype), "value": _vectors(rng, (t, hkv, dim), dtype),
        "slot_mapping": slots, **_random_cache(rng, n, b, hkv, dim, k_bits, v_bits), "rotation": rot,
        "k_codebook": _codebook(rng, dim, k_bits), "v_codebook": _codebook(rng, dim, v_bits)},
        {"k_bits": (k_bits, "int"), "v_bits": (v_bits, "int")})


def _attention_case(rng, index, dim, dtype) -> Case:
    k_bits, v_bits = _bits(rng), _bits(rng)
    s, hkv, group = int(rng.integers(0, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
    n, b, m = int(rng.integers(1, 7)), int(rng.integers(1, 6)), int(rng.integers(0, 5))
    if rng.random() < 0.12:  # long contexts: many tiles of the online softmax, and split contexts merged
        s, hkv, b, m = int(rng.integers(1, 3)), 1, 16, int(rng.integers(20, 70))
        n = s * m + 2
    cache = _random_cache(rng, n, b, hkv, dim, k_bits, v_bits)
    ctx = rng.integers(0, m * b + 1, s).astype(np.int32)
    # used entries point into the cache; the others hold junk the kernels must never read
    tables = rng.integers(-(2**31), 2**31 - 1, (s, m), dtype=np.int64).astype(np.int32)
    for i in range(s):
        used = -(-int(ctx[i]) // b)
        tables[i, :used] = rng.integers(0, n, used)
    if rng.random() < 0.3:  # NaN/inf norms: in used slots they reach the output, in unused ones never
        cache["k_norms"] = _specials(rng, cache["k_norms"], 0.05, (np.nan, np.inf, 0.0))
        cache["v_norms"] = _specials(rng, cache["v_norms"], 0.05, (np.nan, np.inf, 0.0))
    query = (rng.standard_normal((s, hkv * group, dim)) * rng.choice([0.3, 1.0, 2.0])).astype(np.float32)
    attrs = {"k_bits": (k_bits, "int"), "v_bits": (v_bits, "int")}
    if rng.random() < 0.6:
        attrs["scale"] = (float(rng.choice([0.0, rng.uniform(0.01, 0.5)])), "float")
    return Case(index, "TQPagedAttention", {
        "query": _specials(rng, query, 0.01, (np.nan, 0.0)).astype(dtype), **cache, "block_tables": tables,
        "context_lens": ctx, "rotation": _rotation(rng, dim), "k_codebook": _codebook(rng, dim, k_bits),
        "v_codebook": _codebook(rng, dim, v_bits)}, attrs)


def _add_defect(rng, case: Case) -> None:
    """Make ``case`` invalid in one way, and say who must refuse it."""
    inp, op = case.inputs, case.op
    bits_attrs = [a for a in case.attrs if a.endswith("bits")]
    books = [k for k in inp if k.endswith("codebook")]
    defects = ["bits-range", "bits-float", "rotation-size", "codebook-size", "codebook-order", "codebook-nan",
               "rank", "unknown-attribute"]
    if op in ("TQDecode", "TQCacheUpdate", "TQPagedAttention"):
        defects += ["packed-size"]
    if op == "TQPagedAttention":
        defects += ["ctx-negative", "ctx-over", "table-entry", "heads", "scale-negative", "scale-nan", "scale-int",
                    "table-dtype", "norms-shape"]
    if op == "TQCacheUpdate":
        defects += ["slot-over", "value-shape", "value-dtype", "slot-dtype"]
    if op == "TQDecode":
        defects += ["norms-shape", "norms-dtype"]
    if op == "TQEncode":
        defects += ["x-scalar", "x-dtype"]
    defect = str(rng.choice(defects))
    both, data = True, False
    if defect == "bits-range":
        name = str(rng.choice(bits_attrs))
        case.attrs[name] = (int(rng.choice([0, 9, -1, 16])), "int")
    elif defect == "bits-float":
        name = str(rng.choice(bits_attrs))
        case.attrs[name] = (float(case.attrs[name][0]), "float")
    elif defect == "rotation-size":
        # TQDecode reads D from the rotation: only a size that changes the packed size is wrong there
        d = inp["rotation"].shape[0] + (8 if op == "TQDecode" else int(rng.choice([-1, 1, 8])))
        inp["rotation"] = np.eye(max(d, 1), dtype=np.float32)
    elif defect == "codebook-size":
        name = str(rng.choice(books))
        inp[name] = np.sort(rng.uniform(-1, 1, inp[name].size * 2)).astype(np.float32)
    elif defect == "codebook-order":
        name = str(rng.choice(books))
        inp[name] = inp[name][::-1].copy()
        data = True
    elif defect == "codebook-nan":
        name = str(rng.choice(books))
        inp[name] = inp[name].copy()
        inp[name][int(rng.integers(0, inp[name].size))] = np.nan
        data = True
    elif defect == "rank":
        # x, codes and norms take any number of leading dims: a rank change is valid there
        name = str(rng.choice([k for k in inp if k not in ("x", "codes", "norms")]))
        a = inp[name]
        inp[name] = a[None] if a.ndim <= 1 or rng.random() < 0.5 else a.reshape(-1)
    elif defect == "unknown-attribute":
        case.attrs[str(rng.choice(["scal", "bit", "kbits", "alpha"]))] = (1, "int")
        both = False  # a keyword the PyTorch API does not have: nothing to call it with
    elif defect == "packed-size":
        name = {"TQDecode": "codes"}.get(op) or str(rng.choice(["k_codes", "v_codes"]))
        a = inp[name]
        inp[name] = np.zeros((*a.shape[:-1], a.shape[-1] + 1), np.uint8)
    elif defect == "ctx-negative":
        if not inp["context_lens"].size:
            return _add_defect(rng, case)
        inp["context_lens"] = inp["context_lens"].copy()
        inp["context_lens"][int(rng.integers(0, inp["context_lens"].size))] = -int(rng.integers(1, 100))
        data = True
    elif defect == "ctx-over":
        if not inp["context_lens"].size:
            return _add_defect(rng, case)
        m, b = inp["block_tables"].shape[1], inp["k_codes"].shape[1]
        inp["context_lens"] = inp["context_lens"].copy()
        inp["context_lens"][int(rng.integers(0, inp["context_lens"].size))] = m * b + int(rng.integers(1, 50))
        data = True
    elif defect == "table-entry":
        ctx, tables = inp["context_lens"], inp["block_tables"].copy()
        b, n = inp["k_codes"].shape[1], inp["k_codes"].shape[0]
        used = [(i, j) for i in range(tables.shape[0]) for j in range(-(-int(ctx[i]) // b))]
        if not used:
            return _add_defect(rng, case)
        i, j = used[int(rng.integers(0, len(used)))]
        tables[i, j] = int(rng.choice([-1, n, n + 7, -(2**31), 2**31 - 1]))
        inp["block_tables"] = tables
        data = True
    elif defect == "heads":
        q = inp["query"]
        hkv = inp["k_codes"].shape[2]
        if hkv == 1:
            inp["query"] = np.zeros((q.shape[0], 0, q.shape[2]), q.dtype)
        else:
            inp["query"] = np.zeros((q.shape[0], q.shape[1] + 1, q.shape[2]), q.dtype)
    elif defect == "scale-negative":
        case.attrs["scale"] = (-float(rng.uniform(0.01, 2)), "float")
    elif defect == "scale-nan":
        case.attrs["scale"] = (float(rng.choice([np.nan, np.inf])), "float")
    elif defect == "scale-int":
        case.attrs["scale"] = (int(rng.integers(1, 4)), "int")
        both = False  # a Python int is a number to the PyTorch API; an INT attribute is refused in ONNX
    elif defect == "table-dtype":
        inp["block_tables"] = inp["block_tables"].astype(np.int64)
    elif defect == "norms-shape":
        name = "norms" if op == "TQDecode" else str(rng.choice(["k_norms", "v_norms"]))
        a = inp[name]
        inp[name] = np.zeros((*a.shape[:-1], a.shape[-1] + 1) if a.ndim else (1,), np.float32)
    elif defect == "slot-over":
        if not inp["slot_mapping"].size:
            return _add_defect(rng, case)
        n, b = inp["k_codes"].shape[:2]
        inp["slot_mapping"] = inp["slot_mapping"].copy()
        inp["slot_mapping"][int(rng.integers(0, inp["slot_mapping"].size))] = n * b + int(rng.integers(0, 5))
        data = True
    elif defect == "value-shape":
        v = inp["value"]
        inp["value"] = np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype)
    elif defect == "value-dtype":
        inp["value"] = inp["value"].astype(np.float16 if inp["value"].dtype == np.float32 else np.float32)
    elif defect == "slot-dtype":
        inp["slot_mapping"] = inp["slot_mapping"].astype(np.float32)
    elif defect == "norms-dtype":
        inp["norms"] = inp["norms"].astype(np.float64)
    elif defect == "x-scalar":
        inp["x"] = np.asarray(1.0, inp["x"].dtype)
    elif defect == "x-dtype":
        inp["x"] = inp["x"].astype(np.float64)
    case.defect = defect
    case.ref_refuses = both
    case.ort_refuses = True
    case.data_defect = data


# ---------------------------------------------------------------------------------------- backends


class Refused(Exception):
    """A backend refused a call; ``clear`` says whether its message names what is wrong."""

    def __init__(self, message: str, clear: bool):
        super().__init__(message)
        self.clear = clear


def _call_args(case: Case, to_tensor):
    spec = ops.OPS_BY_NAME[case.op]
    args = [to_tensor(case.inputs[t.name]) for t in spec.inputs]
    attrs = {k: v for k, (v, _) in case.attrs.items()}
    order = [a.name for a in spec.attributes]
    unknown = [k for k in attrs if k not in order]
    if unknown:
        raise TypeError(f"unknown attributes {unknown}")
    positional = [attrs[a] for a in order if a in attrs and a != "scale"]
    return args, positional, attrs.get("scale")


def run_torch(case: Case, device: str = "cpu") -> dict[str, np.ndarray]:
    """The PyTorch API (tq_deploy.dispatch) on ``device``; raises Refused for a ValueError."""
    import torch

    from tq_deploy import dispatch

    def to_tensor(a):
        return torch.from_numpy(np.array(a, copy=True)).to(device)

    args, bits, scale = _call_args(case, to_tensor)
    fn = {"TQEncode": dispatch.encode, "TQDecode": dispatch.decode, "TQCacheUpdate": dispatch.cache_update,
          "TQPagedAttention": dispatch.paged_attention}[case.op]
    extra = () if scale is None else (scale,)
    try:
        out = fn(*args, *bits, *extra)
    except ValueError as err:
        raise Refused(str(err), "expected" in str(err)) from None
    if isinstance(out, torch.Tensor):
        out = (out,)
    names = ops.OPS_BY_NAME[case.op].output_names()
    return {n: t.detach().float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy()
            for n, t in zip(names, out)}


_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
               np.dtype(np.int64): 7, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def node_model(op: str, attrs: dict[str, tuple[float, str]], input_types: dict[str, int], float_type: int,
               opset_version: int = ops.DOMAIN_VERSION):
    """A one-node model of ``op`` whose every input is a graph input of unknown shape (so any shape
    reaches the kernel's own checks) with the given element types; attributes typed as given."""
    import onnx
    from onnx import helper

    spec = ops.OPS_BY_NAME[op]
    inputs = [helper.make_tensor_value_info(t.name, input_types[t.name], None) for t in spec.inputs]
    outputs = [helper.make_tensor_value_info(t.name, float_type if t.type_param else
                                             {"tensor(uint8)": 2, "tensor(float)": 1}[t.types[0]], None)
               for t in spec.outputs]
    node = helper.make_node(op, spec.input_names(), spec.output_names(), name=op, domain=ops.DOMAIN)
    for name, (value, kind) in attrs.items():
        node.attribute.append(helper.make_attribute(name, int(value) if kind == "int" else float(value)))
    graph = helper.make_graph([node], f"{op}_fuzz", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ops.DOMAIN, opset_version)], ir_version=10)


class OrtRunner:
    """ONNX Runtime (CPU EP) with the project's library through make_session; sessions are cached
    per (op, attributes, input types): a loose one-node model serves every shape."""

    def __init__(self, library=None, provider: str = "cpu"):
        self.library, self.provider, self.sessions = library, provider, {}

    def __call__(self, case: Case) -> dict[str, np.ndarray]:
        from tq_deploy.runtime import session as rt

        spec = ops.OPS_BY_NAME[case.op]
        types = {k: _ONNX_TYPES.get(v.dtype, 1) for k, v in case.inputs.items()}
        float_type = next((types[t.name] for t in spec.inputs if t.type_param), 1)  # TQDecode: float32 out
        key = (case.op, tuple(sorted(case.attrs.items())), tuple(sorted(types.items())))
        try:
            if key not in self.sessions:
                model = node_model(case.op, case.attrs, types, float_type)
                self.sessions[key] = rt.make_session(model.SerializeToString(), provider=self.provider,
                                                     library=self.library)
            out = rt.run(self.sessions[key], case.inputs)
        except ValueError as err:  # the project's own checks (attributes, opset, feeds)
            raise Refused(str(err), "expected" in str(err)) from None
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's exception types
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            message = str(err)
            names = [spec.name, *spec.input_names(), *(a.name for a in spec.attributes)]
            raise Refused(message, any(n in message for n in names)) from None
        return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------- agreement


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def close_rows(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> str:
    """'' when every row agrees: the same rows non-finite, finite rows within rtol of the row's max."""
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    g, w = _rows(got.astype(np.float64)), _rows(want.astype(np.float64))
    if not g.size:
        return ""
    bad_g, bad_w = ~np.isfinite(g).all(axis=1), ~np.isfinite(w).all(axis=1)
    if (bad_g != bad_w).any():
        r = int(np.argmax(bad_g != bad_w))
        return f"{what}: row {r} non-finite={bool(bad_g[r])}, expected {bool(bad_w[r])} (the reference's)"
    ok = ~bad_w
    if not ok.any():
        return ""
    scale = np.abs(w[ok]).max(axis=1, keepdims=True)
    err = np.abs(g[ok] - w[ok]) - rtol * (np.abs(w[ok]) + scale) - 1e-30
    if (err > 0).any():
        r, c = np.unravel_index(int(np.argmax(err)), err.shape)
        return (f"{what}: {g[ok][r, c]!r} at row {int(np.flatnonzero(ok)[r])} column {c}, expected "
                f"{w[ok][r, c]!r} (rtol {rtol} of the row's max {float(scale[r, 0]):.3g})")
    return ""


def _unit_rotated(x: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    norm = np.linalg.norm(x64, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(norm > 0, x64 / norm, 0.0)
    return u @ rotation.astype(np.float64).T


def codes_agree(got: np.ndarray, want: np.ndarray, x: np.ndarray, rotation: np.ndarray, codebook: np.ndarray,
                bits: int, what: str, tie_tol: float = TIE_TOL) -> str:
    """Identical codes except at rounding ties (y within TIE_TOL of a boundary, adjacent codes);
    vectors with a non-finite coordinate or norm have unspecified codes and are skipped."""
    from tq_deploy.reference.packing import unpack_codes
    import torch

    dim = x.shape[-1]
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    if not got.size:
        return ""
    g = unpack_codes(torch.from_numpy(np.ascontiguousarray(got)), bits, dim).numpy().reshape(-1, dim).astype(int)
    w = unpack_codes(torch.from_numpy(np.ascontiguousarray(want)), bits, dim).numpy().reshape(-1, dim).astype(int)
    x2 = x.reshape(-1, dim).astype(np.float64)
    finite = np.isfinite(x2).all(axis=1) & np.isfinite(np.linalg.norm(x2, axis=1))
    diff = (g != w) & finite[:, None]
    if not diff.any():
        return ""
    y = _unit_rotated(x2, rotation)
    bounds = (codebook[1:].astype(np.float64) + codebook[:-1]) / 2
    for r, c in zip(*np.nonzero(diff)):
        lo = min(g[r, c], w[r, c])
        if abs(g[r, c] - w[r, c]) != 1 or abs(y[r, c] - bounds[lo]) > tie_tol * (1 + abs(y[r, c])):
            return (f"{what}: code {g[r, c]} at vector {r} coordinate {c}, expected {w[r, c]} "
                    f"(y={y[r, c]:.7g}, nearest boundary {bounds[lo]:.7g})")
    return ""


def agree(case: Case, got: dict[str, np.ndarray], want: dict[str, np.ndarray], gpu: bool = False) -> str:
    """'' when backend outputs ``got`` agree with the reference's ``want`` for valid ``case``."""
    inp = case.inputs
    float_t = np.float16 if any(v.dtype == np.float16 for v in inp.values()) else np.float32
    rtol = GPU_ROW_RTOL if gpu else ROW_RTOL[float_t]
    norm_rtol = 1e-5 if gpu else NORM_RTOL
    tie_tol = GPU_TIE_TOL if gpu else TIE_TOL
    if case.op == "TQEncode":
        problem = close_rows(got["norms"].reshape(-1, 1), want["norms"].reshape(-1, 1), norm_rtol, "norms")
        return problem or codes_agree(got["codes"], want["codes"], inp["x"], inp["rotation"], inp["codebook"],
                                      case.attrs["bits"][0], "codes", tie_tol)
    if case.op == "TQDecode":
        return close_rows(got["x_hat"], want["x_hat"], rtol, "x_hat")
    if case.op == "TQPagedAttention":
        return close_rows(got["out"], want["out"], rtol, "out")
    # TQCacheUpdate: written slots as an encode, every other slot byte for byte
    for name in CACHE:
        out = got[f"{name}_out"]
        if out.shape != want[f"{name}_out"].shape:
            return f"{name}_out: shape {out.shape}, expected {want[f'{name}_out'].shape}"
    slots = inp["slot_mapping"]
    hkv, dim = inp["key"].shape[1], inp["key"].shape[2]
    n, b = inp["k_codes"].shape[:2]
    last = {int(s): t for t, s in enumerate(slots) if s >= 0}
    written = np.zeros(n * b, bool)
    written[list(last)] = True
    for name in CACHE:
        g = got[f"{name}_out"].reshape(n * b, hkv, -1)
        w = want[f"{name}_out"].reshape(n * b, hkv, -1)
        if not np.array_equal(g[~written], w[~written], equal_nan=name.endswith("norms")):
            return f"{name}_out: a slot no token names changed"
    order = sorted(last)
    tokens = [last[s] for s in order]
    for side, bits_attr in (("k", "k_bits"), ("v", "v_bits")):
        src = inp["key" if side == "k" else "value"][tokens].astype(np.float32)
        g_n = got[f"{side}_norms_out"].reshape(n * b, hkv)[order]
        w_n = want[f"{side}_norms_out"].reshape(n * b, hkv)[order]
        problem = close_rows(g_n.reshape(-1, 1), w_n.reshape(-1, 1), norm_rtol, f"{side}_norms_out")
        if problem:
            return problem
        g_c = got[f"{side}_codes_out"].reshape(n * b, hkv, -1)[order]
        w_c = want[f"{side}_codes_out"].reshape(n * b, hkv, -1)[order]
        problem = codes_agree(g_c, w_c, src.reshape(-1, dim), inp["rotation"], inp[f"{side}_codebook"],
                              case.attrs[bits_attr][0], f"{side}_codes_out", tie_tol)
        if problem:
            return problem
    return ""


# ---------------------------------------------------------------------------------------- one case


def check_case(case: Case, ort: OrtRunner | None, device: str | None = None) -> list[Finding]:
    """Run ``case`` on the reference, ONNX Runtime and (``device="cuda"``) the PyTorch API on CUDA;
    the findings (module docstring), empty when every rule holds."""
    found = []

    def finding(kind, detail):
        found.append(Finding(case.index, case.op, kind, f"{detail} [{case.describe()}]"))

    want, ref_error = None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = run_torch(case, "cpu")
    except Refused as err:
        ref_error = err
        if not err.clear:
            finding("unclear-error", f"reference: {err}")
    except TypeError as err:
        if case.defect != "unknown-attribute":
            finding("unclear-error", f"reference raised TypeError: {err}")
    except Exception as err:  # noqa: BLE001 - anything but ValueError is a finding
        finding("unclear-error", f"reference raised {type(err).__name__}: {err}")
    if case.ref_refuses and want is not None:
        finding("accepted-invalid", f"reference accepted a call with defect {case.defect}")
    if not case.defect and ref_error is not None:
        finding("refused-valid", f"reference refused a valid call: {ref_error}")

    if ort is not None:
        try:
            got = ort(case)
        except Refused as err:
            if not err.clear:
                finding("unclear-error", f"onnxruntime: {err}")
            if not case.ort_refuses:
                finding("refused-valid", f"onnxruntime refused a call the reference takes: {err}")
        except Exception as err:  # noqa: BLE001
            finding("unclear-error", f"onnxruntime raised {type(err).__name__}: {err}")
        else:
            if case.ort_refuses:
                finding("accepted-invalid", f"onnxruntime accepted a call with defect {case.defect}")
            elif want is not None:
                problem = agree(case, got, want)
                if problem:
                    finding("mismatch", f"onnxruntime vs reference: {problem}")

    if device and device != "cpu":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = run_torch(case, device)
        except Refused as err:
            if not err.clear:
                finding("unclear-error", f"{device}: {err}")
            if not case.defect:
                finding("refused-valid", f"{device} refused a valid call: {err}")
        except TypeError:
            pass
        except Exception as err:  # noqa: BLE001
            finding("unclear-error", f"{device} raised {type(err).__name__}: {err}")
        else:
            if case.ref_refuses and not case.data_defect:
                finding("accepted-invalid", f"{device} accepted a call with defect {case.defect}")
            elif not case.defect and want is not None:
                problem = agree(case, got, want, gpu=True)
                if problem:
                    finding("mismatch", f"{device} vs reference: {problem}")
    return found


# ---------------------------------------------------------------------------------------- driver


@dataclass
class FuzzReport:
    seed: int
    first: int
    cases: int
    seconds: float = 0.0
    valid: int = 0
    findings: list[Finding] = field(default_factory=list)
    batches: int = 0

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"seed": self.seed, "first": self.first, "cases": self.cases, "valid": self.valid,
                "seconds": round(self.seconds, 2), "batches": self.batches, "passed": self.passed,
                "findings": [f.to_dict() for f in self.findings]}

    def to_text(self) -> str:
        lines = [f"fuzz seed {self.seed}, cases {self.first}..{self.first + self.cases - 1} "
                 f"({self.valid} valid, {self.cases - self.valid} with a defect) in {self.batches} child "
                 f"processes, {self.seconds:.1f} s: {len(self.findings)} findings"]
        lines += [f"  case {f.case} {f.op} {f.kind}: {f.detail}" for f in self.findings[:50]]
        if len(self.findings) > 50:
            lines.append(f"  ... {len(self.findings) - 50} more")
        return "\n".join(lines)


def _worker(seed: int, first: int, count: int, library, device, op_names) -> None:
    """Runs cases [first, first + count) in this process, one JSON line per case on stdout."""
    import torch

    torch.set_num_threads(1)
    ort = OrtRunner(library)
    # Fault injection for the fuzzer's own tests: the child aborts or hangs at this case, as a
    # kernel that crashes or never returns would.
    abort_at = int(os.environ.get("TQ_DEPLOY_FUZZ_ABORT_AT", -1))
    hang_at = int(os.environ.get("TQ_DEPLOY_FUZZ_HANG_AT", -1))
    for index in range(first, first + count):
        if index == abort_at:
            os.abort()
        if index == hang_at:
            time.sleep(10**6)
        case = draw_case(seed, index, op_names)
        findings = check_case(case, ort, device)
        print(json.dumps({"case": index, "valid": not case.defect, "findings": [f.to_dict() for f in findings]}),
              flush=True)


def _child(seed, first, count, library, device, op_names, timeout):
    """Run cases [first, first + count) in a child process; returns (result lines, status, stderr)
    where status is the exit code, or None when the child made no progress for ``timeout`` seconds
    (then it is killed)."""
    import queue
    import threading

    command = [sys.executable, "-m", "tq_deploy.validate.fuzz", "--worker", "--seed", str(seed), "--first",
               str(first), "--cases", str(count), "--ops", ",".join(op_names)]
    if library:
        command += ["--library", os.fspath(library)]
    if device:
        command += ["--device", device]
    # one BLAS thread: hundreds of small QR factorizations are far slower on an oversubscribed pool
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    errors: list[str] = []

    def pump(stream, put, end):
        for line in stream:
            put(line)
        if end:
            put(None)  # the child closed its stdout: it has exited or is about to

    threading.Thread(target=pump, args=(child.stdout, lines.put, True), daemon=True).start()
    threading.Thread(target=pump, args=(child.stderr, errors.append, False), daemon=True).start()
    out = []
    while True:
        try:
            line = lines.get(timeout=timeout)  # a hang is a case that gives no result for `timeout` s
        except queue.Empty:
            child.kill()
            child.wait()
            return out, None, "".join(errors)
        if line is None:
            break
        out.append(line)
    return out, child.wait(), "".join(errors)


def fuzz(seed: int = 0, cases: int = 200, *, first: int = 0, batch: int = 100, timeout: float = 120.0,
         library=None, device: str | None = None, op_names=OPS) -> FuzzReport:
    """Cases [first, first + cases) of ``seed``, ``batch`` per child process (module docstring).
    ``timeout``: seconds a child may go without finishing a case (its start-up included)."""
    report = FuzzReport(seed, first, cases)
    start = time.perf_counter()
    pending = [(i, min(batch, first + cases - i)) for i in range(first, first + cases, max(batch, 1))]
    while pending:
        lo, count = pending.pop(0)
        lines, rc, err = _child(seed, lo, count, library, device, op_names, timeout)
        report.batches += 1
        seen = set()
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            seen.add(row["case"])
            report.valid += bool(row["valid"])
            report.findings += [Finding(**f) for f in row["findings"]]
        if rc == 0:
            continue
        # the child died (signal, abort) or hung: the first case it did not finish is the culprit
        culprit = next((i for i in range(lo, lo + count) if i not in seen), None)
        if culprit is None:  # every case done, then a failed exit (teardown)
            report.findings.append(Finding(lo + count - 1, "-", "crash" if rc else "hang",
                                           f"child exited with status {rc} after its last case: {err.strip()[-300:]}"))
            continue
        kind = "hang" if rc is None else "crash"
        why = f"no result within {timeout:.0f} s" if rc is None else \
            f"child exited with status {rc}" + (f": {err.strip().splitlines()[-1]}" if err.strip() else "")
        case = draw_case(seed, culprit, op_names)
        report.valid += not case.defect
        report.findings.append(Finding(culprit, case.op, kind, f"{why} [{case.describe()}]"))
        if culprit + 1 < lo + count:
            pending.insert(0, (culprit + 1, lo + count - culprit - 1))
    report.seconds = time.perf_counter() - start
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_deploy.validate.fuzz", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    op_names = tuple(args.ops.split(","))
    if args.worker:
        _worker(args.seed, args.first, args.cases, args.library, args.device, op_names)
        return 0
    return run(args)


def add_arguments(parser) -> None:
    from tq_deploy.cli import count

    parser.add_argument("--seed", type=int, default=0, help="seed of the run (case i draws from (seed, i))")
    parser.add_argument("--cases", type=count(1), default=200, help="number of cases (default 200)")
    parser.add_argument("--first", type=count(0), default=0, help="index of the first case (replay: --first I "
                                                                  "--cases 1)")
    parser.add_argument("--batch", type=count(1), default=100, help="cases per child process (default 100)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a case may take before it counts as a hang (default 120)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default all: {','.join(OPS)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="also run the PyTorch API on this device's tensors (cuda: the GPU kernels)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")


def run(args) -> int:
    from tq_deploy import files

    unknown = [o for o in args.ops.split(",") if o not in OPS]
    if unknown:
        raise ValueError(f"--ops has {unknown}, expected a subset of {list(OPS)}")
    if args.json:
        files.check_writable(args.json, "--json")
    report = fuzz(args.seed, args.cases, first=args.first, batch=args.batch, timeout=args.timeout,
                  library=args.library, device=args.device, op_names=tuple(args.ops.split(",")))
    print(report.to_text())
    if args.json:
        files.write_text(args.json, json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
