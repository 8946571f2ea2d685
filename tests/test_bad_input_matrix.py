"""The bad-input matrix of docs/reliability.md, enforced: each class of bad input on each backend.

Columns (backends):
  reference   the PyTorch API (tq_deploy.dispatch) on CPU tensors, i.e. the PyTorch reference
  ort_cpu     the custom-op library in ONNX Runtime's CPU EP, through tq_deploy.runtime.session
  torch_cuda  the PyTorch API on CUDA tensors (CUDA kernel library, Triton where it does not take a call)
  triton      the same with TQ_DEPLOY_BACKEND=triton (the Triton kernels only)
  ort_cuda    the custom-op library's CUDA EP kernels (onnxruntime-gpu)
  trt         the TensorRT plugins, driven through libtq_trt_harness as TensorRT drives them

The CPU cells run everywhere; the GPU cells are marked ``gpu`` (skipped without a CUDA device). The TensorRT plugin's attribute and shape refusals happen before any launch, so
those cells run on the CPU too (the harness's dry run). Each cell says what the backend does with
the bad input: ``Refuse(fragments)`` (an error whose message holds each fragment), or ``Agree``
(outputs equal the reference's on the same call, or on the call ``as_if`` describes, and ``check``
holds). Expected values come from the reference, never from the backend under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tq_deploy import ops
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.paged import cache_update_reference
from tq_deploy.reference.quantizer import decode_reference, encode_reference
from tq_deploy.reference.rotation import make_rotation
from tq_deploy.validate import fuzz
from tq_deploy.validate.fuzz import Case, Refused

D, HQ, HKV, B, N, M = 64, 4, 2, 16, 6, 3
BITS = 4
CPU_BACKENDS = ("reference", "ort_cpu")
GPU_BACKENDS = ("torch_cuda", "triton", "ort_cuda", "trt")
BACKENDS = CPU_BACKENDS + GPU_BACKENDS


# ---------------------------------------------------------------------------------- valid calls


def _rng():
    return np.random.default_rng(20261201)


ROT = make_rotation(D, seed=3).numpy()
CB = lloyd_max_codebook(D, BITS).numpy()


def encode_case() -> Case:
    x = _rng().standard_normal((5, D)).astype(np.float32)
    return Case(0, "TQEncode", {"x": x, "rotation": ROT, "codebook": CB}, {"bits": (BITS, "int")})


def decode_case() -> Case:
    codes, norms = encode_reference(torch.from_numpy(encode_case().inputs["x"]), torch.from_numpy(ROT),
                                    torch.from_numpy(CB), BITS)
    return Case(0, "TQDecode", {"codes": codes.numpy(), "norms": norms.numpy(), "rotation": ROT, "codebook": CB},
                {"bits": (BITS, "int")})


def _filled_cache(rng):
    """A cache whose used slots hold real encodings (block 5 and slots past each context stay zero)."""
    cache = [torch.zeros(N, B, HKV, ops.packed_size(D, BITS), dtype=torch.uint8), torch.zeros(N, B, HKV),
             torch.zeros(N, B, HKV, ops.packed_size(D, BITS), dtype=torch.uint8), torch.zeros(N, B, HKV)]
    slots = torch.arange(5 * B)
    kv = torch.from_numpy(rng.standard_normal((5 * B, HKV, D)).astype(np.float32))
    cache_update_reference(kv, kv * 2, slots, *cache, torch.from_numpy(ROT), torch.from_numpy(CB),
                           torch.from_numpy(CB), BITS, BITS)
    return dict(zip(fuzz.CACHE, (c.numpy() for c in cache)))


def attention_case() -> Case:
    """S=2: sequence 0 has 20 tokens (blocks 0, 1), sequence 1 has 33 (blocks 2, 3, 4); the unused
    table entry of sequence 0 holds junk."""
    rng = _rng()
    tables = np.array([[0, 1, -7], [2, 3, 4]], np.int32)
    return Case(0, "TQPagedAttention", {
        "query": rng.standard_normal((2, HQ, D)).astype(np.float32), **_filled_cache(rng), "block_tables": tables,
        "context_lens": np.array([20, 33], np.int32), "rotation": ROT, "k_codebook": CB, "v_codebook": CB},
        {"k_bits": (BITS, "int"), "v_bits": (BITS, "int")})


def lone_token_case() -> Case:
    """Sequence 0 holds one token whose key norm is 1e33 and whose query heads point away from it:
    every score of those rows is about -1e33 (finite). Softmax over one token is 1: the output is
    that token's value, whatever its score."""
    case = attention_case()
    inp = case.inputs
    inp["context_lens"] = np.array([1, 33], np.int32)
    codes = torch.from_numpy(inp["k_codes"][0, 0].copy())  # block 0, slot 0: [Hkv, P]
    keys = decode_reference(codes, torch.ones(HKV), torch.from_numpy(ROT), torch.from_numpy(CB), BITS).numpy()
    inp["k_norms"] = inp["k_norms"].copy()
    inp["k_norms"][0, 0] = 1e33
    inp["query"] = inp["query"].copy()
    inp["query"][0] = -np.repeat(keys, HQ // HKV, axis=0) * 4
    return case


def key_mean_case(drop: str = "", **inputs) -> Callable[[], Case]:
    """The attention case with the optional key mean (ops.py): a large mean for each KV head and
    Llama's RoPE rates; ``drop`` leaves one of the two inputs out, ``inputs`` replace values."""

    def build() -> Case:
        case = attention_case()
        case.inputs["key_mean"] = (_rng().standard_normal((HKV, D)) * 3).astype(np.float32)
        case.inputs["rope_inv_freq"] = (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)
        for name, value in inputs.items():
            case.inputs[name] = value(case.inputs[name].copy()) if callable(value) else value
        case.inputs.pop(drop, None)
        return case

    return build


def update_case() -> Case:
    rng = _rng()
    return Case(0, "TQCacheUpdate", {
        "key": rng.standard_normal((3, HKV, D)).astype(np.float32),
        "value": rng.standard_normal((3, HKV, D)).astype(np.float32),
        "slot_mapping": np.array([1, 17, 40], np.int64), **_filled_cache(rng), "rotation": ROT, "k_codebook": CB,
        "v_codebook": CB}, {"k_bits": (BITS, "int"), "v_bits": (BITS, "int")})


def changed(make: Callable[[], Case], inputs=None, attrs=None, drop=()) -> Callable[[], Case]:
    """A case builder: ``make()`` with some inputs replaced (a value, or a function of the old one)."""

    def build() -> Case:
        case = make()
        for name, value in (inputs or {}).items():
            case.inputs[name] = value(case.inputs[name].copy()) if callable(value) else value
        for name, value in (attrs or {}).items():
            case.attrs[name] = value
        for name in drop:
            case.attrs.pop(name)
        return case

    return build


def setitem(index, value):
    def fn(a):
        a[index] = value
        return a

    return fn


# ---------------------------------------------------------------------------------- expectations


@dataclasses.dataclass(frozen=True)
class Refuse:
    fragments: tuple[str, ...]
    at_launch: bool = False  # the TensorRT plugin refuses only when enqueue calls the CUDA launcher


@dataclasses.dataclass(frozen=True)
class Agree:
    as_if: Callable[[Case], Case] | None = None  # the call whose reference outputs it must equal
    check: Callable[[dict, Case], None] | None = None  # a property of the outputs
    compare: bool = True  # False: only `check` (the result is unspecified but must not crash)
    xfail: str = ""  # a known defect of this backend: the cell is expected to fail (strictly)


@dataclasses.dataclass(frozen=True)
class Skip:
    why: str


def refuse(*fragments: str) -> Refuse:
    return Refuse(fragments)


SAME = Agree()


def nan_rows(*rows):
    def check(out, case):
        bad = ~np.isfinite(out["out"].astype(np.float32)).all(axis=-1)
        want = np.zeros_like(bad)
        for r in rows:
            want[r] = True
        assert (bad == want).all(), f"non-finite rows {np.argwhere(bad).tolist()}, expected {rows}"

    return check


def all_finite(out, case):
    for name, a in out.items():
        assert np.isfinite(a.astype(np.float64)).all(), f"{name} has non-finite values"


def never_zeros(out, case):
    """Rows of a context > 0 are finite or NaN, never silently all zeros."""
    rows = out["out"].astype(np.float32)
    for s, ctx in enumerate(case.inputs["context_lens"]):
        if ctx > 0:
            assert (rows[s] != 0).any(axis=-1).all(), f"sequence {s} (context {ctx}) has an all-zero row"


def zero_row(seq):
    def check(out, case):
        assert not out["out"][seq].any(), f"sequence {seq} (context 0) gave a nonzero output"

    return check


def _shape(a, shape):
    assert a.shape == shape, f"shape {a.shape}, expected {shape}"


def ran(out, case):
    """The result is unspecified; the call must only return (no crash, no hang)."""


def ctx_set(seq, value):
    def as_if(case):
        case.inputs["context_lens"] = case.inputs["context_lens"].copy()
        case.inputs["context_lens"][seq] = value
        return case

    return as_if


def slots_as(values):
    def as_if(case):
        case.inputs["slot_mapping"] = np.array(values, np.int64)
        return case

    return as_if


# ---------------------------------------------------------------------------------- the matrix

_MESSAGE_ONLY_PYTHON = Skip("the PyTorch API takes Python keywords and numbers: no such input exists there")
_GPU_UNCHECKED = "device data: not checked without a host synchronization"


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    what: str
    case: Callable[[], Case]
    cells: dict  # backend -> Refuse | Agree | Skip; a missing backend is "as the reference"


def _attention_attrs(**attrs):
    return changed(attention_case, attrs=attrs)


ROWS = [
    # ---- attributes: refused when the session / engine is made, before any data is read
    Row("bits-out-of-range", "k_bits=9", _attention_attrs(k_bits=(9, "int")),
        {"reference": refuse("k_bits=9", "expected one of"), "ort_cpu": refuse("k_bits=9", "expected one of"),
         "trt": refuse("createPlugin", "k_bits")}),
    Row("bits-float-typed", "bits=4.0 as a FLOAT attribute", changed(encode_case, attrs={"bits": (4.0, "float")}),
        {"reference": refuse("bits=4.0", "expected one of"), "ort_cpu": refuse("bits", "FLOAT", "expected INT"),
         "trt": refuse("createPlugin", "bits has type float")}),
    Row("scale-int-typed", "scale=2 as an INT attribute (what make_node(..., scale=2) writes)",
        _attention_attrs(scale=(2, "int")),
        {"reference": Agree(as_if=lambda c: dataclasses.replace(c, attrs={**c.attrs, "scale": (2.0, "float")})),
         "ort_cpu": refuse("scale", "INT", "expected FLOAT"), "ort_cuda": refuse("scale", "INT", "expected FLOAT"),
         "trt": refuse("createPlugin", "scale has type int")}),
    Row("unknown-attribute", "an attribute the op does not have (scal=0.5)", _attention_attrs(scal=(0.5, "float")),
        {"reference": _MESSAGE_ONLY_PYTHON, "torch_cuda": _MESSAGE_ONLY_PYTHON, "triton": _MESSAGE_ONLY_PYTHON,
         "ort_cpu": refuse("'scal' is unknown", "expected a subset of"),
         "ort_cuda": refuse("'scal' is unknown"), "trt": refuse("createPlugin", "unknown attribute scal")}),
    Row("scale-negative", "scale=-1", _attention_attrs(scale=(-1.0, "float")),
        {"reference": refuse("scale=-1.0", "expected"), "ort_cpu": refuse("scale=-1", "expected"),
         "trt": refuse("createPlugin", "scale")}),
    Row("scale-nan", "scale=NaN", _attention_attrs(scale=(float("nan"), "float")),
        {"reference": refuse("scale=nan", "expected"), "ort_cpu": refuse("scale=nan", "expected"),
         "trt": refuse("createPlugin", "scale")}),
    Row("scale-inf", "scale=inf", _attention_attrs(scale=(float("inf"), "float")),
        {"reference": refuse("scale=inf", "expected"), "ort_cpu": refuse("scale=inf", "expected"),
         "trt": refuse("createPlugin", "scale")}),
    Row("scale-overflow", "scale=1e38: finite, but every score overflows", _attention_attrs(scale=(1e38, "float")),
        {"reference": Agree(check=nan_rows((0,), (1,)))}),
    # ---- types, ranks and shapes
    Row("dtype", "context_lens int64 (contract: int32)",
        changed(attention_case, inputs={"context_lens": lambda a: a.astype(np.int64)}),
        {"reference": refuse("context_lens.dtype=torch.int64", "torch.int32"), "ort_cpu": refuse("context_lens"),
         "trt": refuse("supportsFormatCombination")}),
    Row("head-dim", "a query of D=32 with a [64, 64] rotation",
        changed(attention_case, inputs={"query": np.zeros((2, HQ, 32), np.float32)}),
        {"reference": refuse("query.shape[-1]=32", "head_dim=64"), "ort_cpu": refuse("rotation.shape[0]=64", "D=32"),
         "trt": refuse("configurePlugin")}),
    Row("packed-size", "k_codes rows one byte too long",
        changed(attention_case, inputs={"k_codes": lambda a: np.zeros((*a.shape[:3], a.shape[3] + 1), np.uint8)}),
        {"reference": refuse("k_codes.shape=", "expected"), "ort_cpu": refuse("k_codes", "Pk"),
         "trt": refuse("configurePlugin")}),
    Row("codebook-length", "a 32-entry v_codebook for v_bits=4",
        changed(attention_case, inputs={"v_codebook": np.linspace(-1, 1, 32).astype(np.float32)}),
        {"reference": refuse("v_codebook has 32 entries", "2**bits = 16"), "ort_cpu": refuse("v_codebook", "[16]"),
         "trt": refuse("configurePlugin")}),
    Row("heads", "Hq=3 query heads over Hkv=2",
        changed(attention_case, inputs={"query": np.zeros((2, 3, D), np.float32)}),
        {"reference": refuse("query.shape[1]=3", "num_kv_heads=2"), "ort_cpu": refuse("Hq=3", "Hkv=2"),
         "trt": refuse("configurePlugin")}),
    Row("kv-heads-zero", "caches with Hkv=0", changed(attention_case, inputs={
        "query": np.zeros((2, 0, D), np.float32),
        **{c: (lambda a: np.zeros((*a.shape[:2], 0, *a.shape[3:]), a.dtype)) for c in fuzz.CACHE}}),
        {"reference": refuse("num_kv_heads=0", ">= 1"), "ort_cpu": refuse("Hkv=0"),
         "trt": refuse("configurePlugin")}),
    Row("empty-batch", "S=0 sequences", changed(attention_case, inputs={
        "query": np.zeros((0, HQ, D), np.float32), "block_tables": np.zeros((0, M), np.int32),
        "context_lens": np.zeros(0, np.int32)}), {"reference": Agree(check=lambda o, c: _shape(o["out"], (0, HQ, D)))}),
    Row("no-tokens", "a cache update of T=0 tokens", changed(update_case, inputs={
        "key": np.zeros((0, HKV, D), np.float32), "value": np.zeros((0, HKV, D), np.float32),
        "slot_mapping": np.zeros(0, np.int64)}), {}),
    # ---- data: checked on the host (reference, ORT CPU); on a GPU skipped or clamped, never read out of bounds
    Row("ctx-negative", "context_lens[1]=-1", changed(attention_case, inputs={"context_lens": setitem(1, -1)}),
        {"reference": refuse("context_lens has -1", "expected 0..48"),
         "ort_cpu": refuse("context_lens[1]=-1", "expected 0 <= context_lens"),
         **{g: Agree(as_if=ctx_set(1, 0), check=zero_row(1)) for g in GPU_BACKENDS}}),
    Row("ctx-over-capacity", "context_lens[1]=49 > M * B = 48",
        changed(attention_case, inputs={"context_lens": setitem(1, 49)}),
        {"reference": refuse("context_lens has 49", "expected 0..48"), "ort_cpu": refuse("context_lens[1]=49"),
         **{g: Agree(as_if=ctx_set(1, 48)) for g in GPU_BACKENDS}}),
    Row("table-entry", "a block-table entry in use = N (outside the cache)",
        changed(attention_case, inputs={"block_tables": setitem((1, 2), N)}),
        {"reference": refuse("block_tables has entry 6 in use", "0..5"),
         "ort_cpu": refuse("block_tables[1, 2]=6", "[0, 6)"),
         # the GPU kernels skip that block's tokens: sequence 1 then attends to its first 32
         **{g: Agree(as_if=ctx_set(1, 32)) for g in GPU_BACKENDS}}),
    Row("table-junk", "junk in block-table entries past the context (never read)",
        changed(attention_case, inputs={"block_tables": setitem((0, 2), 2**31 - 1)}), {}),
    Row("slot-out-of-range", "slot_mapping[1] = N * B (outside the cache)",
        changed(update_case, inputs={"slot_mapping": setitem(1, N * B)}),
        {"reference": refuse("slot_mapping has slot 96", "< num_blocks*block_size = 96"),
         "ort_cpu": refuse("slot_mapping[1]=96", "< num_blocks * block_size = 96"),
         **{g: Agree(as_if=slots_as([1, -1, 40])) for g in GPU_BACKENDS}}),
    Row("slot-negative", "a negative slot (padding token): skipped",
        changed(update_case, inputs={"slot_mapping": setitem(1, -1)}), {}),
    Row("slot-duplicate", "three tokens name one slot: the last one is kept",
        changed(update_case, inputs={"slot_mapping": np.array([40, 40, 40], np.int64)}), {}),
    Row("codebook-descending", "a descending k_codebook",
        changed(attention_case, inputs={"k_codebook": lambda a: a[::-1].copy()}),
        {"reference": refuse("k_codebook=", "strictly ascending"),
         "ort_cpu": refuse("k_codebook[1]=", "strictly ascending"),
         **{g: Agree(check=ran, compare=False) for g in GPU_BACKENDS}}),
    Row("codebook-nan", "a NaN centroid", changed(encode_case, inputs={"codebook": setitem(3, np.nan)}),
        {"reference": refuse("codebook=", "strictly ascending"), "ort_cpu": refuse("codebook[3]=nan"),
         **{g: Agree(check=ran, compare=False) for g in GPU_BACKENDS}}),
    # ---- values: NaN stays visible; only context 0 gives zeros
    Row("nan-query", "a NaN in sequence 1's first query head",
        changed(attention_case, inputs={"query": setitem((1, 0, 5), np.nan)}),
        {"reference": Agree(check=nan_rows((1, 0)))}),
    Row("nan-norm", "a NaN key norm in a slot sequence 1 reads (block 3, KV head 0)",
        changed(attention_case, inputs={"k_norms": setitem((3, 2, 0), np.nan)}),
        {"reference": Agree(check=nan_rows((1, 0), (1, 1)))}),
    Row("inf-norm", "an infinite value norm in a slot sequence 0 reads (block 1, KV head 1)",
        changed(attention_case, inputs={"v_norms": setitem((1, 0, 1), np.inf)}),
        {"reference": Agree(check=nan_rows((0, 2), (0, 3)))}),
    Row("nan-norm-unused", "NaN and inf norms in slots no sequence reads (block 5, block 0 past nothing)",
        changed(attention_case, inputs={"k_norms": setitem(5, np.nan), "v_norms": setitem((1, 10), np.inf)}),
        {"reference": Agree(check=all_finite)}),
    Row("query-huge", "a query of 1e38s: the scores of one row overflow, that row is NaN",
        changed(attention_case, inputs={"query": lambda a: a * np.float32(1e38)}),
        {"reference": Agree(check=nan_rows((0, 1))),
         # the GPU kernels rotate the query in fp16/bf16 products: their overflow comes sooner, so
         # more rows may be NaN; none may be zeros
         **{g: Agree(check=never_zeros, compare=False) for g in GPU_BACKENDS}}),
    Row("score-below--1e30", "a lone token whose every score is about -1e33 (a finite score)", lone_token_case,
        {"reference": Agree(check=lambda o, c: (all_finite(o, c), never_zeros(o, c))),
         # a running max that started at a finite floor (-1e30) would outrank these scores, give every
         # token the weight exp(score - floor) = 0 and the row zeros
         **{g: Agree(check=never_zeros) for g in GPU_BACKENDS}}),
    Row("v-norm-above-fp16", "value norms of 1e5 (above fp16's 65504): the output is finite",
        changed(attention_case, inputs={"v_norms": lambda a: a * np.float32(1e5)}),
        {"reference": Agree(check=all_finite)}),
    Row("context-zero", "context_lens[0]=0: the only input that gives zeros",
        changed(attention_case, inputs={"context_lens": setitem(0, 0)}), {"reference": Agree(check=zero_row(0))}),
    # ---- the optional key mean of the attention ops
    Row("key-mean", "key_mean and rope_inv_freq given: every backend adds q . R_t mu", key_mean_case(), {}),
    Row("key-mean-alone", "key_mean without rope_inv_freq", key_mean_case(drop="rope_inv_freq"),
        {"reference": refuse("key_mean is given and rope_inv_freq is None", "expected both or neither"),
         "ort_cpu": refuse("input key_mean is given without rope_inv_freq, expected both or neither"),
         "trt": refuse("configurePlugin", "expected both or neither")}),
    Row("key-mean-shape", "rope_inv_freq of D entries (expected D/2)",
        key_mean_case(rope_inv_freq=np.ones(D, np.float32)),
        {"reference": refuse("rope_inv_freq.shape=(64,), expected (32,)"),
         "ort_cpu": refuse("input rope_inv_freq has shape [64], expected [D/2] = [32]"),
         "trt": refuse("configurePlugin", "rope_inv_freq.shape[0]=64, expected 32")}),
    Row("key-mean-nan", "a NaN in KV head 0's key mean",
        key_mean_case(key_mean=setitem((0, 7), np.nan)),
        {"reference": refuse("key_mean holds a non-finite value"),
         "ort_cpu": refuse("input key_mean holds nan at 7, expected finite float32 values"),
         # device data: not read on the host; the query heads of KV head 0 (0, 1) read it in every score
         **{g: Agree(check=nan_rows((0, 0), (0, 1), (1, 0), (1, 1)), compare=False) for g in GPU_BACKENDS}}),
    Row("garbage-codes", "random code bytes, padding bits set",
        changed(decode_case, inputs={"codes": lambda a: _rng().integers(0, 256, a.shape, dtype=np.uint8)}), {}),
    Row("decode-nonfinite-norm", "NaN and inf norms in decode",
        changed(decode_case, inputs={"norms": lambda a: np.array([np.nan, np.inf, 1.0, 0.0, 2.0], np.float32)}),
        {"reference": Agree(check=lambda o, c: np.testing.assert_array_equal(
            ~np.isfinite(o["x_hat"]).all(axis=1), [True, True, False, False, False]))}),
    Row("encode-nonfinite", "NaN and inf coordinates in encode: the norm says so (codes unspecified)",
        changed(encode_case, inputs={"x": setitem((np.array([0, 1]), np.array([3, 7])), [np.nan, -np.inf])}),
        {"reference": Agree(check=lambda o, c: np.testing.assert_array_equal(
            np.isfinite(o["norms"]), [False, False, True, True, True]))}),
    Row("encode-extreme", "vectors of 1e20s and 1e-30s: finite, exact norms (scaled)",
        changed(encode_case, inputs={"x": lambda a: a * np.array([[1e20], [1e-30], [1], [1e19], [1e-25]],
                                                                    np.float32)}),
        {"reference": Agree(check=lambda o, c: np.testing.assert_allclose(
            o["norms"], np.linalg.norm(c.inputs["x"].astype(np.float64), axis=1), rtol=1e-6))}),
]
ROWS_BY_ID = {r.id: r for r in ROWS}
assert len(ROWS_BY_ID) == len(ROWS)


def cell(row: Row, backend: str):
    """The expectation of a cell: given, else the reference's own refusal, else agreement."""
    if backend in row.cells:
        return row.cells[backend]
    ref = row.cells.get("reference", SAME)
    if isinstance(ref, Refuse) and backend in ("torch_cuda", "triton"):
        return ref  # the PyTorch API runs the same checks before any backend
    if isinstance(ref, Refuse):
        return row.cells.get("ort_cpu", ref) if backend == "ort_cuda" else refuse()
    if isinstance(ref, Agree) and backend != "reference":
        return Agree(check=ref.check)  # same property, and agreement with the reference
    return ref


# ---------------------------------------------------------------------------------- backends


@contextlib.contextmanager
def _no_context():
    yield


def _torch(case: Case, device: str, choice: str | None = None):
    from tq_deploy import dispatch

    with dispatch.use_backend(choice) if choice else _no_context():
        return fuzz.run_torch(case, device)


def _ort(case: Case, provider: str):
    from tq_deploy.runtime.library import NativeLibraryNotFoundError
    from tq_deploy.runtime.session import cuda_unavailable_reason

    pytest.importorskip("onnxruntime")
    try:
        runner = fuzz.OrtRunner(provider=provider)
        if provider == "cuda":
            why = cuda_unavailable_reason()
            if why:
                pytest.skip(f"ORT CUDA EP: {why}")
        return runner(case)
    except NativeLibraryNotFoundError as err:
        pytest.skip(f"custom-op library not built: {err}")


def _trt(case: Case, capfd, dry_run: bool):
    """The plugin through the harness; outputs preallocated from the contract's shapes."""
    from tq_deploy.runtime import library
    from tq_deploy.runtime.trt_harness import harness_enqueue

    try:
        library.locate("trt"), library.locate("trt_harness")
    except library.NativeLibraryNotFoundError as err:
        pytest.skip(f"TensorRT plugin library not built: {err}")
    device = "cpu" if dry_run else "cuda"
    inputs = [torch.from_numpy(np.ascontiguousarray(case.inputs[t.name])).to(device)
              for t in ops.OPS_BY_NAME[case.op].inputs if t.name in case.inputs]
    outputs = _trt_outputs(case, device)
    attrs = {k: v for k, (v, _) in case.attrs.items()}
    kinds = {k: kind for k, (_, kind) in case.attrs.items()}
    try:
        harness_enqueue(case.op, attrs, inputs, list(outputs.values()), dry_run=dry_run, attr_kinds=kinds,
                        stream=0 if dry_run else torch.cuda.current_stream().cuda_stream)
    except RuntimeError as err:
        log = capfd.readouterr().err  # the plugin logs why it refused (TensorRT's logger, or stderr)
        raise Refused(f"{err} | {' '.join(log.split())}", True) from None
    if not dry_run:
        torch.cuda.synchronize()
    return {k: v.float().cpu().numpy() if v.dtype == torch.float16 else v.cpu().numpy() for k, v in outputs.items()}


def _trt_outputs(case: Case, device: str) -> dict:
    inp = case.inputs
    if case.op == "TQEncode":
        lead, bits = inp["x"].shape[:-1], int(case.attrs["bits"][0])
        return {"codes": torch.zeros(*lead, ops.packed_size(inp["x"].shape[-1], bits), dtype=torch.uint8,
                                     device=device), "norms": torch.zeros(lead, device=device)}
    if case.op == "TQDecode":
        return {"x_hat": torch.zeros(*inp["norms"].shape, inp["rotation"].shape[0], device=device)}
    if case.op == "TQCacheUpdate":
        return {f"{c}_out": torch.from_numpy(inp[c].copy()).to(device) for c in fuzz.CACHE}
    return {"out": torch.zeros(inp["query"].shape, dtype=torch.from_numpy(inp["query"]).dtype, device=device)}


def run_backend(backend: str, case: Case, capfd):
    if backend == "reference":
        return fuzz.run_torch(case, "cpu")
    if backend == "ort_cpu":
        return _ort(case, "cpu")
    if backend == "torch_cuda":
        return _torch(case, "cuda")
    if backend == "triton":
        return _torch(case, "cuda", "triton")
    if backend == "ort_cuda":
        return _ort(case, "cuda")
    return _trt(case, capfd, dry_run=not torch.cuda.is_available())


def _cells():
    out = []
    for row in ROWS:
        for backend in BACKENDS:
            expect = cell(row, backend)
            if isinstance(expect, Skip):
                continue
            gpu = backend in GPU_BACKENDS
            if backend == "trt" and isinstance(expect, Refuse) and not expect.at_launch:
                gpu = False  # refused before any launch: the harness's dry run needs no GPU
            marks = [pytest.mark.gpu] if gpu else []
            if getattr(expect, "xfail", ""):
                marks.append(pytest.mark.xfail(reason=expect.xfail, strict=True))
            out.append(pytest.param(row.id, backend, id=f"{row.id}-{backend}", marks=marks))
    return out


@pytest.mark.parametrize("row_id,backend", _cells())
def test_matrix(row_id, backend, capfd):
    row = ROWS_BY_ID[row_id]
    expect = cell(row, backend)
    case = row.case()
    if isinstance(expect, Refuse):
        with pytest.raises(Refused) as info:
            run_backend(backend, case, capfd)
        message = str(info.value)
        assert info.value.clear, f"{backend}: the error does not name what is wrong: {message}"
        for fragment in expect.fragments:
            assert fragment in message, f"{backend}: {fragment!r} not in the error: {message}"
        return
    got = run_backend(backend, case, capfd)
    if expect.check is not None:
        expect.check(got, case)
    if backend == "reference" or not expect.compare:
        return
    basis = expect.as_if(row.case()) if expect.as_if else row.case()
    want = fuzz.run_torch(basis, "cpu")
    problem = fuzz.agree(basis, got, want, gpu=backend in GPU_BACKENDS)
    assert not problem, f"{backend} vs the reference: {problem}"


# ---------------------------------------------------------------------------------- beyond one call


def test_raw_onnxruntime_cannot_see_unknown_attributes_or_the_opset_version():
    """The library alone, in a plain onnxruntime.InferenceSession, cannot refuse these two: ONNX
    Runtime registers a custom domain for opset versions 1..1000 with one schema per op and gives a
    kernel no list of a node's attributes. tq_deploy.runtime.session.make_session refuses both (the
    ort_cpu column above); this test fails, and docs/reliability.md must change, the day ORT shows them."""
    ort = pytest.importorskip("onnxruntime")
    from tq_deploy.runtime.library import NativeLibraryNotFoundError, ort_library_path

    try:
        path = ort_library_path()
    except NativeLibraryNotFoundError as err:
        pytest.skip(str(err))
    case = attention_case()
    types = {k: fuzz.ONNX_TYPES[v.dtype] for k, v in case.inputs.items()}
    options = ort.SessionOptions()
    options.register_custom_ops_library(path)
    options.log_severity_level = 4
    for model in (fuzz.node_model(case.op, {**case.attrs, "scal": (0.5, "float")}, types),
                  fuzz.node_model(case.op, case.attrs, types, opset_version=2)):
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, case.inputs)
        want = fuzz.run_torch(case, "cpu")["out"]
        assert not fuzz.close_rows(out, want, 1e-4, "out")


def test_engine_build_refuses_another_opset_version():
    """The TensorRT plugin creators see no opset version either: the engine build refuses it first
    (before TensorRT is even imported, so this runs without TensorRT)."""
    from tq_deploy.export.single_op import make_op_model
    from tq_deploy.runtime.tensorrt import build_engine

    model = make_op_model("TQPagedAttention", head_dim=D, bits=BITS, num_q_heads=HQ, num_kv_heads=HKV)
    next(o for o in model.opset_import if o.domain == ops.DOMAIN).version = 2
    with pytest.raises(ValueError, match="opset 'turboquant' version 2, expected version 1"):
        build_engine(model, None)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_io_binding_an_output_over_another_input_is_refused(backend):
    """TQCacheUpdate may write each cache output over its own input (in place); bound over another
    input's buffer (k_codes_out over v_codes) it would corrupt that cache: refused, naming both."""
    ort = pytest.importorskip("onnxruntime")
    from tq_deploy.runtime.session import cuda_unavailable_reason, make_session

    if backend == "cuda" and cuda_unavailable_reason():
        pytest.skip(cuda_unavailable_reason())
    case = update_case()
    types = {k: fuzz.ONNX_TYPES[v.dtype] for k, v in case.inputs.items()}
    session = make_session(fuzz.node_model(case.op, case.attrs, types).SerializeToString(), provider=backend)
    values = {k: ort.OrtValue.ortvalue_from_numpy(v.copy(), backend, 0) for k, v in case.inputs.items()}
    before = values["v_codes"].numpy().copy()
    for wrong, over in (("k_codes_out", "v_codes"), ("v_norms_out", "k_norms")):
        binding = session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name in fuzz.CACHE:
            binding.bind_ortvalue_output(f"{name}_out", values[over] if f"{name}_out" == wrong else values[name])
        with pytest.raises(Exception, match=f"output {wrong} shares memory with input {over}"):
            session.run_with_iobinding(binding)
    np.testing.assert_array_equal(values["v_codes"].numpy(), before)  # nothing was written before the refusal


def test_a_model_config_that_would_hide_nan_is_refused():
    """rope_theta=0 turns every query into NaN; the config is refused rather than computed into
    an output that could hide it."""
    from tq_deploy.reference.model import TQModelConfig

    for theta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"rope_theta={theta!r}, expected a finite number > 0"):
            TQModelConfig(rope_theta=theta)


def test_meta_and_mixed_device_tensors_are_refused():
    from tq_deploy import dispatch

    case = attention_case()
    args = [torch.from_numpy(case.inputs[t.name].copy()) for t in ops.PAGED_ATTENTION.required_inputs()]
    args[0] = torch.empty(args[0].shape, device="meta")
    with pytest.raises(ValueError, match="query is on the meta device"):
        dispatch.paged_attention(*args, BITS, BITS)
    with pytest.raises(ValueError, match=r"dtype=torch.int32, expected one of"):
        dispatch.decode(*[torch.from_numpy(v.copy()) for v in decode_case().inputs.values()], BITS, dtype=torch.int32)


@pytest.mark.gpu
def test_cuda_codes_with_cpu_norms_are_refused():
    from tq_deploy import dispatch

    case = attention_case()
    args = [torch.from_numpy(case.inputs[t.name].copy()) for t in ops.PAGED_ATTENTION.required_inputs()]
    args = [a.cuda() if i != 2 else a for i, a in enumerate(args)]  # k_norms stays on the CPU
    with pytest.raises(ValueError, match="k_norms is on cpu, expected cuda"):
        dispatch.paged_attention(*args, BITS, BITS)


def test_triton_cache_update_never_writes_past_the_cache():
    """A slot >= N * B must skip its token (the CUDA launcher's rule, tq_cuda.h), never write past the
    cache: here the cache is the first blocks of a larger buffer whose tail must stay zero. On the
    GPU, or on the CPU under the Triton interpreter."""
    pytest.importorskip("triton")
    from tq_deploy import triton as tq_triton
    from tq_deploy.reference import checks

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    case = update_case()
    big = {c: torch.zeros((2 * N, *case.inputs[c].shape[1:]), dtype=torch.from_numpy(case.inputs[c]).dtype,
                          device=dev) for c in fuzz.CACHE}
    cache = [big[c][:N] for c in fuzz.CACHE]
    key = torch.from_numpy(case.inputs["key"]).to(dev)
    args = checks.check_cache_update(key, key, torch.tensor([0, N * B, N * B + 5], device=dev), *cache,
                                     torch.from_numpy(ROT).to(dev), torch.from_numpy(CB).to(dev),
                                     torch.from_numpy(CB).to(dev), BITS, BITS, check_data=False)
    assert tq_triton.OPS["cache_update"][0](args), "the Triton cache update does not take this call"
    tq_triton.OPS["cache_update"][1](args)
    if dev == "cuda":
        torch.cuda.synchronize()
    assert big["k_norms"][:N].any(), "slot 0 was not written: the test would pass for the wrong reason"
    for c in fuzz.CACHE:
        assert not big[c][N:].any(), f"{c}: the Triton cache update wrote past the cache (slot >= N * B)"
