"""The ONNX Runtime custom-op library (plugins/ort) against the PyTorch reference.

Every test builds a one-node model with :mod:`tq_deploy.export.single_op`, runs it on
the CPU execution provider with the library registered, and compares with
:mod:`tq_deploy.reference` on fresh random inputs (seed printed on failure).

Bounds:
  codes      identical except rounding ties: at most 1e-4 of the codes (and never fewer
             than two) differ, each between adjacent codes (|diff| == 1)
  norms      rtol 2e-6
  x_hat      max abs error <= 4e-6 * max|x_hat_ref|
  attention  float32: |out - ref| <= 1e-4 * |ref| + 1e-5 * max|ref| elementwise;
             float16 query/output: within 2 fp16 ulps (rtol 2e-3, atol 2e-3 * max|ref|)
Invalid inputs make the Run (or the session creation, for attributes) fail with an
ORT error whose message names the input or attribute.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from tq_deploy.export.single_op import initializer_arrays, make_op_model  # noqa: E402
from tq_deploy.ops import packed_size  # noqa: E402
from tq_deploy.reference.packing import unpack_codes  # noqa: E402
from tq_deploy.reference.paged import (  # noqa: E402
    cache_update_reference,
    dense_attention_reference,
    paged_attention_reference,
)
from tq_deploy.reference.quantizer import decode_reference, encode_reference  # noqa: E402
from tq_deploy.runtime.library import NativeLibraryNotFoundError, ort_library_path  # noqa: E402
from ort_support import assert_attention_close, assert_passes_on_portable_kernels  # noqa: E402

try:
    LIBRARY = ort_library_path()
except NativeLibraryNotFoundError as err:  # pragma: no cover - depends on the build
    pytest.skip(f"custom-op library not built: {err}", allow_module_level=True)

MAX_CODE_MISMATCH = 1e-4
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def make_session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.register_custom_ops_library(LIBRARY)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    feeds = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}
    return make_session(model).run(None, feeds)


def initializers(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.copy()) for name, array in initializer_arrays(model).items()}


def assert_codes_match(codes: np.ndarray, ref: torch.Tensor, bits: int, dim: int, what: str) -> None:
    """Identical codes except rare rounding ties, which may only move to an adjacent code."""
    got = unpack_codes(torch.from_numpy(np.ascontiguousarray(codes)), bits, dim).int()
    want = unpack_codes(ref, bits, dim).int()
    diff = (got - want).abs()
    differing = int((diff > 0).sum())
    # a fraction, but never fewer than two ties: a few thousand codes (D 72, 3 bits) hold one tie now and then
    allowed = max(MAX_CODE_MISMATCH * diff.numel(), 2)
    assert differing <= allowed, (f"{what}: {differing} of {diff.numel()} codes differ, expected at most "
                                  f"{allowed:g} (rounding ties)")
    assert diff.max().item() <= 1 if diff.numel() else True, f"{what}: a code differs by {diff.max().item()} (> 1)"


def loosen(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same node with every input a graph input of unknown shape (initializers moved to
    inputs), so a test can feed inconsistent shapes that only the kernel's checks catch."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for init in graph.initializer:
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, None))
    del graph.initializer[:]
    for value in list(graph.input) + list(graph.output):
        value.type.tensor_type.ClearField("shape")
    return model


def expect_ort_error(fn, *fragments: str) -> str:
    """fn() must raise an onnxruntime error whose message holds every fragment."""
    with pytest.raises(Exception) as info:
        fn()
    assert type(info.value).__module__.startswith("onnxruntime"), f"not an ORT error: {info.value!r}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in ORT error: {message}"
    return message


# --------------------------------------------------------------------------------------------
# TQEncode / TQDecode
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_encode_matches_reference(dim, bits, dtype, gen):
    model = make_op_model("TQEncode", head_dim=dim, bits=bits, dtype=dtype, leading_dims=("a", "b"),
                          seed=int(torch.randint(0, 2**30, (1,), generator=gen)))
    init = initializers(model)
    x = (torch.randn(37, 29, dim, generator=gen) * torch.rand(37, 29, 1, generator=gen) * 4)
    x[0, :3] = 0.0  # zero vectors: norm 0, y = 0
    x = x.to(TORCH_DTYPES[dtype])
    codes, norms = run(model, {"x": x})
    ref_codes, ref_norms = encode_reference(x, init["rotation"], init["codebook"], bits)
    assert codes.shape == (37, 29, packed_size(dim, bits)) and codes.dtype == np.uint8
    assert norms.shape == (37, 29) and norms.dtype == np.float32
    np.testing.assert_allclose(norms, ref_norms.numpy(), rtol=2e-6, atol=0)
    assert_codes_match(codes, ref_codes, bits, dim, f"TQEncode D={dim} bits={bits} {dtype}")


@pytest.mark.parametrize("dim,bits", [(72, 3), (40, 3), (36, 1), (20, 2), (66, 4), (20, 5), (38, 6), (30, 7), (9, 8)])
def test_encode_odd_dims_partial_bytes(dim, bits, gen):
    """D * bits not a multiple of 8 or 24: the last byte is partly used, 3-bit groups are cut."""
    model = make_op_model("TQEncode", head_dim=dim, bits=bits)
    init = initializers(model)
    x = torch.randn(501, dim, generator=gen)
    codes, norms = run(model, {"x": x})
    ref_codes, ref_norms = encode_reference(x, init["rotation"], init["codebook"], bits)
    np.testing.assert_allclose(norms, ref_norms.numpy(), rtol=2e-6)
    assert_codes_match(codes, ref_codes, bits, dim, f"TQEncode D={dim} bits={bits}")
    # unused high bits of the last byte stay zero, as the reference packs them
    if (dim * bits) % 8:
        np.testing.assert_array_equal(codes[:, -1] >> ((dim * bits) % 8), 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [64, 128, 256, 72])
def test_decode_matches_reference(dim, bits, gen):
    model = make_op_model("TQDecode", head_dim=dim, bits=bits, leading_dims=("a", "b"))
    init = initializers(model)
    codes = torch.randint(0, 256, (13, 17, packed_size(dim, bits)), dtype=torch.uint8, generator=gen)
    norms = torch.rand(13, 17, generator=gen) * 5
    (x_hat,) = run(model, {"codes": codes, "norms": norms})
    ref = decode_reference(codes, norms, init["rotation"], init["codebook"], bits).numpy()
    assert x_hat.shape == (13, 17, dim) and x_hat.dtype == np.float32
    assert np.abs(x_hat - ref).max() <= 4e-6 * np.abs(ref).max()


def test_encode_decode_empty_batch():
    encode = make_op_model("TQEncode", head_dim=64, bits=4)
    codes, norms = run(encode, {"x": np.zeros((0, 64), np.float32)})
    assert codes.shape == (0, 32) and norms.shape == (0,)
    decode = make_op_model("TQDecode", head_dim=64, bits=4)
    (x_hat,) = run(decode, {"codes": codes, "norms": norms})
    assert x_hat.shape == (0, 64)


# --------------------------------------------------------------------------------------------
# TQCacheUpdate
# --------------------------------------------------------------------------------------------

def random_cache(gen, n, b, hkv, dim, k_bits, v_bits):
    return (
        torch.randint(0, 256, (n, b, hkv, packed_size(dim, k_bits)), dtype=torch.uint8, generator=gen),
        torch.rand(n, b, hkv, generator=gen) * 3 + 0.1,
        torch.randint(0, 256, (n, b, hkv, packed_size(dim, v_bits)), dtype=torch.uint8, generator=gen),
        torch.rand(n, b, hkv, generator=gen) * 3 + 0.1,
    )


CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")


@pytest.mark.parametrize(
    "dim,k_bits,v_bits,hkv,block_size,dtype",
    [(128, 4, 4, 2, 16, "float32"), (64, 2, 3, 4, 32, "float32"), (256, 3, 1, 1, 16, "float16"),
     (128, 4, 2, 8, 16, "float16"), (72, 3, 3, 2, 16, "float32")],
)
def test_cache_update_matches_reference(dim, k_bits, v_bits, hkv, block_size, dtype, gen):
    model = make_op_model("TQCacheUpdate", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_kv_heads=hkv,
                          block_size=block_size, dtype=dtype)
    init = initializers(model)
    n, t = 9, 40
    cache = random_cache(gen, n, block_size, hkv, dim, k_bits, v_bits)
    slots = torch.randperm(n * block_size, generator=gen)[:t].long()
    slots[torch.randperm(t, generator=gen)[:7]] = -1  # padding tokens are skipped
    key = torch.randn(t, hkv, dim, generator=gen).to(TORCH_DTYPES[dtype])
    value = (torch.randn(t, hkv, dim, generator=gen) * 3).to(TORCH_DTYPES[dtype])
    feeds = {"key": key, "value": value, "slot_mapping": slots, **dict(zip(CACHE_NAMES, cache))}
    outs = run(model, feeds)
    ref = cache_update_reference(key, value, slots, *[c.clone() for c in cache], init["rotation"],
                                 init["k_codebook"], init["v_codebook"], k_bits, v_bits)
    written = torch.zeros(n * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    written = written.reshape(n, block_size)
    for name, out, want, before in zip(CACHE_NAMES, outs, ref, cache):
        assert out.shape == tuple(want.shape), name
        untouched = ~written
        np.testing.assert_array_equal(out[untouched.numpy()], before[untouched].numpy(), err_msg=name)
        if name.endswith("norms"):
            np.testing.assert_allclose(out[written.numpy()], want[written].numpy(), rtol=2e-6, err_msg=name)
        else:
            bits = k_bits if name == "k_codes" else v_bits
            assert_codes_match(out[written.numpy()], want[written], bits, dim, f"TQCacheUpdate {name}")


def test_cache_update_duplicate_slots_last_token_wins(gen):
    dim, bits, hkv, block_size = 64, 4, 2, 16
    model = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=block_size)
    init = initializers(model)
    cache = random_cache(gen, 3, block_size, hkv, dim, bits, bits)
    slots = torch.tensor([5, 9, 5, 30, 9, 5], dtype=torch.int64)
    key = torch.randn(6, hkv, dim, generator=gen)
    value = torch.randn(6, hkv, dim, generator=gen)
    outs = run(model, {"key": key, "value": value, "slot_mapping": slots, **dict(zip(CACHE_NAMES, cache))})
    last_only = torch.tensor([-1, -1, -1, 30, 9, 5], dtype=torch.int64)
    ref = cache_update_reference(key, value, last_only, *[c.clone() for c in cache], init["rotation"],
                                 init["k_codebook"], init["v_codebook"], bits, bits)
    for name, out, want in zip(CACHE_NAMES, outs, ref):
        if name.endswith("norms"):
            np.testing.assert_allclose(out, want.numpy(), rtol=2e-6, err_msg=name)
        else:
            assert_codes_match(out, want, bits, dim, name)


def test_cache_update_then_attention_in_one_graph(gen):
    """Cache outputs of TQCacheUpdate feed TQPagedAttention (ORT may update the cache in place)."""
    dim, bits, hq, hkv, block_size, n = 64, 4, 4, 2, 16, 6
    update = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=block_size)
    attend = make_op_model("TQPagedAttention", head_dim=dim, bits=bits, num_q_heads=hq, num_kv_heads=hkv,
                           block_size=block_size)
    graph = onnx.GraphProto()
    graph.CopyFrom(update.graph)
    upd_node = graph.node[0]
    renamed = {f"{c}_out": f"{c}_new" for c in CACHE_NAMES}
    for i, name in enumerate(upd_node.output):
        upd_node.output[i] = renamed[name]
    att_node = onnx.NodeProto()
    att_node.CopyFrom(attend.graph.node[0])
    for i, name in enumerate(att_node.input):
        att_node.input[i] = f"{name}_new" if name in CACHE_NAMES else name
    graph.node.append(att_node)
    have = {v.name for v in graph.input}
    graph.input.extend(v for v in attend.graph.input if v.name not in have)
    del graph.output[:]
    graph.output.extend(attend.graph.output)
    model = onnx.helper.make_model(graph, opset_imports=update.opset_import, ir_version=update.ir_version)

    init = initializers(update)
    cache = random_cache(gen, n, block_size, hkv, dim, bits, bits)
    t = 20
    slots = torch.arange(t, dtype=torch.int64) + block_size  # tokens 0..19 of a sequence in blocks 1, 2
    key, value = torch.randn(t, hkv, dim, generator=gen), torch.randn(t, hkv, dim, generator=gen)
    query = torch.randn(1, hq, dim, generator=gen)
    tables = torch.tensor([[1, 2]], dtype=torch.int32)
    ctx = torch.tensor([t], dtype=torch.int32)
    (out,) = run(model, {"key": key, "value": value, "slot_mapping": slots, "query": query,
                         "block_tables": tables, "context_lens": ctx, **dict(zip(CACHE_NAMES, cache))})
    updated = cache_update_reference(key, value, slots, *[c.clone() for c in cache], init["rotation"],
                                     init["k_codebook"], init["v_codebook"], bits, bits)
    ref = paged_attention_reference(query, *updated, tables, ctx, init["rotation"], init["k_codebook"],
                                    init["v_codebook"], bits, bits).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


# --------------------------------------------------------------------------------------------
# TQPagedAttention
# --------------------------------------------------------------------------------------------

def attention_inputs(gen, *, dim, k_bits, v_bits, hq, hkv, block_size, context_lens, dtype="float32",
                     spare_blocks=3):
    """Random cache, shuffled block tables (unused entries hold garbage), query."""
    s = len(context_lens)
    m = max(1, max((c + block_size - 1) // block_size for c in context_lens)) + 1
    n = s * m + spare_blocks
    cache = random_cache(gen, n, block_size, hkv, dim, k_bits, v_bits)
    tables = torch.randperm(n, generator=gen)[: s * m].reshape(s, m).int()
    for i, c in enumerate(context_lens):  # entries past a context are never read: fill with junk
        used = (c + block_size - 1) // block_size
        tables[i, used:] = torch.randint(-1000, 1000, (m - used,), generator=gen).int() + 10 * n
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    query = (torch.randn(s, hq, dim, generator=gen) * 2).to(TORCH_DTYPES[dtype])
    feeds = {"query": query, **dict(zip(CACHE_NAMES, cache)), "block_tables": tables, "context_lens": ctx}
    return feeds


def reference_attention(feeds, init, k_bits, v_bits, scale=0.0, oracle=False):
    fn = dense_attention_reference if oracle else paged_attention_reference
    return fn(feeds["query"], *(feeds[c] for c in CACHE_NAMES), feeds["block_tables"], feeds["context_lens"],
              init["rotation"], init["k_codebook"], init["v_codebook"], k_bits, v_bits, scale)


ATTENTION_CASES = [
    # dim, k_bits, v_bits, hq, hkv, block_size, dtype
    (64, 2, 2, 4, 4, 16, "float32"),    # GQA ratio 1
    (128, 3, 3, 8, 2, 16, "float32"),   # ratio 4
    (256, 4, 4, 8, 1, 32, "float32"),   # ratio 8
    (128, 4, 2, 32, 4, 16, "float32"),  # ratio 8, k_bits != v_bits
    (64, 2, 4, 8, 2, 32, "float32"),    # k_bits < v_bits
    (128, 3, 1, 4, 1, 16, "float32"),
    (72, 3, 2, 6, 3, 16, "float32"),    # odd D: partial bytes / 3-bit groups
    (128, 4, 4, 8, 2, 16, "float16"),
    (64, 3, 2, 8, 1, 32, "float16"),
]


@pytest.mark.parametrize("dim,k_bits,v_bits,hq,hkv,block_size,dtype", ATTENTION_CASES)
def test_paged_attention_matches_reference(dim, k_bits, v_bits, hq, hkv, block_size, dtype, gen):
    b = block_size
    context_lens = [1, b - 1, b, b + 1, 300, 0, 2 * b + 5]
    model = make_op_model("TQPagedAttention", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq,
                          num_kv_heads=hkv, block_size=block_size, dtype=dtype)
    init = initializers(model)
    feeds = attention_inputs(gen, dim=dim, k_bits=k_bits, v_bits=v_bits, hq=hq, hkv=hkv, block_size=b,
                             context_lens=context_lens, dtype=dtype)
    (out,) = run(model, feeds)
    assert out.shape == (len(context_lens), hq, dim)
    assert_attention_close(out, reference_attention(feeds, init, k_bits, v_bits), dtype)
    assert not np.any(out[context_lens.index(0)]), "context_lens 0 must give zeros"


def test_paged_attention_matches_dense_oracle_with_scale(gen):
    dim, bits, hq, hkv, b = 128, 4, 8, 2, 16
    model = make_op_model("TQPagedAttention", head_dim=dim, bits=bits, num_q_heads=hq, num_kv_heads=hkv,
                          block_size=b, scale=0.05)
    init = initializers(model)
    feeds = attention_inputs(gen, dim=dim, k_bits=bits, v_bits=bits, hq=hq, hkv=hkv, block_size=b,
                             context_lens=[77, 3, 160])
    (out,) = run(model, feeds)
    assert_attention_close(out, reference_attention(feeds, init, bits, bits, scale=0.05), "float32")
    oracle = reference_attention(feeds, init, bits, bits, scale=0.05, oracle=True).numpy()
    np.testing.assert_allclose(out, oracle, rtol=1e-3, atol=1e-4 * np.abs(oracle).max())


def test_paged_attention_long_context_threads(gen):
    """Many (sequence, KV head) work items over ORT's thread pool, long contexts."""
    dim, bits, hq, hkv, b = 128, 4, 16, 4, 16
    model = make_op_model("TQPagedAttention", head_dim=dim, bits=bits, num_q_heads=hq, num_kv_heads=hkv,
                          block_size=b)
    init = initializers(model)
    feeds = attention_inputs(gen, dim=dim, k_bits=bits, v_bits=bits, hq=hq, hkv=hkv, block_size=b,
                             context_lens=[1000, 1023, 64, 999, 5])
    options = ort.SessionOptions()
    options.register_custom_ops_library(LIBRARY)
    options.intra_op_num_threads = 4
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert_attention_close(out, reference_attention(feeds, init, bits, bits), "float32")


@pytest.mark.parametrize("context_lens,dtype", [([3000], "float32"), ([2500, 0, 700], "float32"),
                                                 ([1537, 1], "float16")])
def test_paged_attention_split_context(context_lens, dtype, gen):
    """Few (sequence, KV head) pairs and long contexts: the kernel splits each context into
    ranges processed in parallel and merges their softmax states (some ranges are empty)."""
    dim, k_bits, v_bits, hq, hkv, b = 128, 4, 3, 8, 2, 16
    model = make_op_model("TQPagedAttention", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq,
                          num_kv_heads=hkv, block_size=b, dtype=dtype)
    init = initializers(model)
    feeds = attention_inputs(gen, dim=dim, k_bits=k_bits, v_bits=v_bits, hq=hq, hkv=hkv, block_size=b,
                             context_lens=context_lens, dtype=dtype)
    (out,) = run(model, feeds)
    assert_attention_close(out, reference_attention(feeds, init, k_bits, v_bits), dtype)


# --------------------------------------------------------------------------------------------
# invalid inputs: the Run fails with an ORT error naming the input, never a crash
# --------------------------------------------------------------------------------------------

def _attention_case(gen, **overrides):
    cfg = dict(dim=64, k_bits=4, v_bits=2, hq=4, hkv=2, block_size=16, context_lens=[20, 5])
    cfg.update(overrides)
    model = make_op_model("TQPagedAttention", head_dim=cfg["dim"], k_bits=cfg["k_bits"], v_bits=cfg["v_bits"],
                          num_q_heads=cfg["hq"], num_kv_heads=cfg["hkv"], block_size=cfg["block_size"])
    feeds = attention_inputs(gen, **cfg)
    feeds = {k: v.numpy() for k, v in feeds.items()}
    feeds.update(initializer_arrays(model))
    return make_session(loosen(model)), feeds


def test_loose_model_runs(gen):
    sess, feeds = _attention_case(gen)
    (out,) = sess.run(None, feeds)
    assert out.shape == feeds["query"].shape


@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (lambda f: f.update(rotation=np.eye(32, dtype=np.float32)), ["rotation", "D"]),
        (lambda f: f.update(rotation=np.ones((64, 32), np.float32)), ["rotation", "square"]),
        (lambda f: f.update(k_codebook=np.linspace(-1, 1, 8).astype(np.float32)), ["k_codebook", "k_bits=4"]),
        (lambda f: f.update(v_codebook=np.linspace(-1, 1, 16).astype(np.float32)), ["v_codebook", "v_bits=2"]),
        (lambda f: f.update(k_codes=f["k_codes"][..., :-1].copy()), ["k_codes", "Pk"]),
        (lambda f: f.update(v_codes=np.zeros(f["v_codes"].shape[:3] + (32,), np.uint8)), ["v_codes", "Pv"]),
        (lambda f: f.update(k_norms=f["k_norms"][:, :8].copy()), ["k_norms", "B"]),
        (lambda f: f.update(v_norms=f["v_norms"][:-1].copy()), ["v_norms", "N"]),
        (lambda f: f.update(v_codes=f["v_codes"][:, :, :1].copy()), ["v_codes", "Hkv"]),
        (lambda f: f.update(query=np.zeros((2, 3, 64), np.float32)), ["query", "Hq=3", "Hkv=2"]),
        (lambda f: f.update(query=np.zeros((2, 4, 32), np.float32)), ["D"]),
        (lambda f: f.update(block_tables=np.zeros((3, 2), np.int32)), ["block_tables", "S"]),
        (lambda f: f.update(context_lens=np.array([20], np.int32)), ["context_lens", "S"]),
        (lambda f: f["block_tables"].__setitem__((1, 0), f["k_codes"].shape[0]), ["block_tables[1, 0]"]),
        (lambda f: f["block_tables"].__setitem__((0, 1), -1), ["block_tables[0, 1]=-1"]),
        (lambda f: f["context_lens"].__setitem__(0, -1), ["context_lens[0]=-1"]),
        (lambda f: f["context_lens"].__setitem__(1, f["block_tables"].shape[1] * 16 + 1), ["context_lens[1]"]),
        (lambda f: f.update(query=np.zeros((2, 4), np.float32)), ["query", "rank"]),
    ],
    ids=["D-vs-rotation", "rotation-not-square", "k-codebook-len", "v-codebook-len", "k-packed", "v-packed",
         "k-norms-B", "v-norms-N", "v-codes-Hkv", "Hq-not-multiple", "query-D", "block-tables-S",
         "context-lens-S", "block-entry-N", "block-entry-negative", "ctx-negative", "ctx-over-capacity",
         "query-rank"],
)
def test_paged_attention_rejects_invalid_inputs(mutate, fragments, gen):
    sess, feeds = _attention_case(gen)
    mutate(feeds)
    message = expect_ort_error(lambda: sess.run(None, feeds), "TQPagedAttention", *fragments)
    assert "expected" in message


def test_paged_attention_ignores_unused_block_entries(gen):
    sess, feeds = _attention_case(gen, context_lens=[16, 0])
    feeds["block_tables"][0, 1:] = 1 << 30  # past ceil(16 / 16) = 1 block: never read
    feeds["block_tables"][1, :] = -5
    (out,) = sess.run(None, feeds)
    assert np.isfinite(out).all() and not out[1].any()


@pytest.mark.parametrize("attr,value", [("k_bits", 9), ("v_bits", 0), ("k_bits", -1)])
def test_paged_attention_rejects_bits_out_of_range(attr, value):
    model = make_op_model("TQPagedAttention", head_dim=64, bits=2, num_q_heads=2, num_kv_heads=1)
    for a in model.graph.node[0].attribute:
        if a.name == attr:
            a.i = value
    expect_ort_error(lambda: make_session(model), "TQPagedAttention", f"{attr}={value}", "expected one of 1, 2, 3, 4, 5, 6, 7, 8")


def test_paged_attention_rejects_negative_scale():
    model = make_op_model("TQPagedAttention", head_dim=64, bits=2, num_q_heads=2, num_kv_heads=1)
    for a in model.graph.node[0].attribute:
        if a.name == "scale":
            a.f = -0.5
    expect_ort_error(lambda: make_session(model), "TQPagedAttention", "scale=-0.5", "expected a finite number >= 0")


def test_encode_decode_reject_bits_out_of_range():
    for op in ("TQEncode", "TQDecode"):
        model = make_op_model(op, head_dim=64, bits=2)
        model.graph.node[0].attribute[0].i = 12
        expect_ort_error(lambda: make_session(model), op, "bits=12")


def _loose(op, **kw):
    model = make_op_model(op, **kw)
    return make_session(loosen(model)), initializer_arrays(model)


@pytest.mark.parametrize(
    "feeds_fn,fragments",
    [
        (lambda i: {"x": np.zeros((3, 32), np.float32), **i}, ["x", "D"]),
        (lambda i: {"x": np.zeros((3, 64), np.float32), **i, "codebook": np.zeros(4, np.float32)},
         ["codebook", "bits=3"]),
        (lambda i: {"x": np.zeros((), np.float32), **i}, ["x", "scalar"]),
    ],
    ids=["x-D", "codebook-len", "scalar"],
)
def test_encode_rejects_invalid_inputs(feeds_fn, fragments):
    sess, init = _loose("TQEncode", head_dim=64, bits=3)
    expect_ort_error(lambda: sess.run(None, feeds_fn(init)), "TQEncode", *fragments)


@pytest.mark.parametrize(
    "codes_shape,norms_shape,fragments",
    [((5, 23), (5,), ["codes", "24"]), ((5, 24), (4,), ["norms", "[5]"]), ((5, 24), (5, 1), ["norms"])],
    ids=["packed-size", "norms-len", "norms-rank"],
)
def test_decode_rejects_invalid_inputs(codes_shape, norms_shape, fragments):
    sess, init = _loose("TQDecode", head_dim=64, bits=3)
    feeds = {"codes": np.zeros(codes_shape, np.uint8), "norms": np.ones(norms_shape, np.float32), **init}
    expect_ort_error(lambda: sess.run(None, feeds), "TQDecode", *fragments)


def _cache_update_feeds(gen, init, t=5, n=3, b=16, hkv=2, dim=64, bits=4):
    cache = random_cache(gen, n, b, hkv, dim, bits, bits)
    return {"key": np.random.default_rng(0).standard_normal((t, hkv, dim)).astype(np.float32),
            "value": np.random.default_rng(1).standard_normal((t, hkv, dim)).astype(np.float32),
            "slot_mapping": np.arange(t, dtype=np.int64), **{k: v.numpy() for k, v in zip(CACHE_NAMES, cache)},
            **init}


@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (lambda f: f["slot_mapping"].__setitem__(2, 3 * 16), ["slot_mapping[2]=48", "< num_blocks * block_size = 48"]),
        (lambda f: f.update(value=f["value"][:, :, :32].copy()), ["value", "D"]),
        (lambda f: f.update(key=f["key"][:, :1].copy()), ["Hkv"]),
        (lambda f: f.update(slot_mapping=f["slot_mapping"][:4].copy()), ["slot_mapping", "T"]),
        (lambda f: f.update(k_norms=f["k_norms"][:2].copy()), ["k_norms", "N"]),
        (lambda f: f.update(v_codebook=np.zeros(4, np.float32)), ["v_codebook", "v_bits=4"]),
        (lambda f: f.update(rotation=np.eye(32, dtype=np.float32)), ["rotation"]),
    ],
    ids=["slot-too-big", "value-D", "key-Hkv", "slots-T", "k-norms-N", "v-codebook", "rotation-D"],
)
def test_cache_update_rejects_invalid_inputs(mutate, fragments, gen):
    sess, init = _loose("TQCacheUpdate", head_dim=64, bits=4, num_kv_heads=2, block_size=16)
    feeds = _cache_update_feeds(gen, init)
    mutate(feeds)
    expect_ort_error(lambda: sess.run(None, feeds), "TQCacheUpdate", *fragments)


def test_portable_kernels_match_reference():
    """The portable (non-AVX2) attention path, forced with TQ_DEPLOY_CPU_KERNELS=portable in a
    fresh process (the choice is made once per process)."""
    selection = "test_paged_attention_matches_reference and (64-2-2-4 or 72-3-2 or 128-4-2-32 or 128-3-1)"
    assert_passes_on_portable_kernels(__file__, LIBRARY, selection, passed=4)


def test_cache_update_in_place_with_io_binding(gen):
    """Binding each cache OrtValue as both input and output updates the cache in place (no copy);
    plain runs leave the caller's input arrays untouched."""
    dim, bits, hkv, block_size = 64, 3, 2, 16
    model = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=block_size)
    init = initializers(model)
    cache = random_cache(gen, 4, block_size, hkv, dim, bits, bits)
    slots = torch.tensor([3, 17, -1, 40], dtype=torch.int64)
    key, value = torch.randn(4, hkv, dim, generator=gen), torch.randn(4, hkv, dim, generator=gen)
    feeds = {"key": key.numpy(), "value": value.numpy(), "slot_mapping": slots.numpy(),
             **{n: c.numpy().copy() for n, c in zip(CACHE_NAMES, cache)}}
    session = make_session(model)
    copies = {n: feeds[n].copy() for n in CACHE_NAMES}
    session.run(None, feeds)
    for n in CACHE_NAMES:
        np.testing.assert_array_equal(feeds[n], copies[n], err_msg=f"{n} input was modified by a plain run")

    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in feeds.items()}
    binding = session.io_binding()
    for n, v in values.items():
        binding.bind_ortvalue_input(n, v)
    for n in CACHE_NAMES:
        binding.bind_ortvalue_output(f"{n}_out", values[n])
    session.run_with_iobinding(binding)
    ref = cache_update_reference(key, value, slots, *[c.clone() for c in cache], init["rotation"],
                                 init["k_codebook"], init["v_codebook"], bits, bits)
    for n, want in zip(CACHE_NAMES, ref):
        got = values[n].numpy()
        if n.endswith("norms"):
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-6, err_msg=n)
        else:
            assert_codes_match(got, want, bits, dim, n)


# --------------------------------------------------------------------------------------------
# edges a mutation pass showed the tests above could not see (docs/reliability.md, "Mutation report")
# --------------------------------------------------------------------------------------------

def test_paged_attention_without_a_scale_attribute_uses_one_over_sqrt_d(gen):
    """A node that omits `scale` (what other exporters write) must use 1/sqrt(D): the same output
    as scale=1/sqrt(D) given explicitly, and not the output of another scale."""
    dim, bits, hq, hkv, b = 100, 3, 4, 2, 16
    model = make_op_model("TQPagedAttention", head_dim=dim, bits=bits, num_q_heads=hq, num_kv_heads=hkv,
                          block_size=b)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "scale"]
    del node.attribute[:]
    node.attribute.extend(kept)
    assert "scale" not in {a.name for a in model.graph.node[0].attribute}
    init = initializers(model)
    feeds = attention_inputs(gen, dim=dim, k_bits=bits, v_bits=bits, hq=hq, hkv=hkv, block_size=b,
                             context_lens=[40, 7])
    feeds["query"] = feeds["query"] * 3  # sharper softmax: the scale shows in the output
    (out,) = run(model, feeds)
    assert_attention_close(out, reference_attention(feeds, init, bits, bits, scale=1 / np.sqrt(dim)), "float32")
    other = reference_attention(feeds, init, bits, bits, scale=1.0).numpy()
    assert np.abs(out - other).max() > 1e-2 * np.abs(other).max(), "the output does not depend on the scale"


@pytest.mark.parametrize("dim", [100, 36, 13])
@pytest.mark.parametrize("k_bits,v_bits", [(1, 2), (2, 1), (3, 4), (4, 3)])
def test_paged_attention_head_dim_not_a_multiple_of_8(dim, k_bits, v_bits, gen):
    """The vectorized unpacking handles whole groups of 8 codes and a scalar tail: D % 8 != 0 runs
    the tail for keys and values of every width it serves (1-4 bits)."""
    hq, hkv, b = 4, 2, 16
    model = make_op_model("TQPagedAttention", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq,
                          num_kv_heads=hkv, block_size=b)
    init = initializers(model)
    feeds = attention_inputs(gen, dim=dim, k_bits=k_bits, v_bits=v_bits, hq=hq, hkv=hkv, block_size=b,
                             context_lens=[1, 33, 70])
    (out,) = run(model, feeds)
    assert_attention_close(out, reference_attention(feeds, init, k_bits, v_bits), "float32")


def test_cache_update_writes_the_first_and_last_slot(gen):
    """Slot 0 and slot N*B - 1 are slots like any other (negative slots skip, 0 does not)."""
    dim, bits, hkv, b, n = 64, 4, 2, 16, 3
    model = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=b)
    init = initializers(model)
    cache = random_cache(gen, n, b, hkv, dim, bits, bits)
    slots = torch.tensor([0, -1, n * b - 1, 5], dtype=torch.int64)
    key, value = torch.randn(4, hkv, dim, generator=gen), torch.randn(4, hkv, dim, generator=gen)
    outs = run(model, {"key": key, "value": value, "slot_mapping": slots, **dict(zip(CACHE_NAMES, cache))})
    ref = cache_update_reference(key, value, slots, *[c.clone() for c in cache], init["rotation"],
                                 init["k_codebook"], init["v_codebook"], bits, bits)
    for name, out, want, before in zip(CACHE_NAMES, outs, ref, cache):
        flat_out, flat_want = out.reshape(n * b, hkv, -1), want.reshape(n * b, hkv, -1).numpy()
        assert not np.array_equal(flat_want[0], before.reshape(n * b, hkv, -1)[0].numpy()), name
        if name.endswith("norms"):
            np.testing.assert_allclose(flat_out, flat_want, rtol=2e-6, err_msg=name)
        else:
            assert_codes_match(out, want, bits, dim, name)


def _dyadic_codebook(bits: int) -> torch.Tensor:
    """Centroids (2k + 1) / 2**bits - 1: boundaries k / 2**(bits - 1) - 1 are exact in float32."""
    k = torch.arange(2**bits, dtype=torch.float64)
    return ((2 * k + 1) / 2**bits - 1).float()


# Unit vectors whose coordinates are exact boundaries of the dyadic codebooks (0 and +-0.5 from 2 bits,
# +-0.25 and +-0.75 from 3 bits on): the norm is exactly 1 in float32, the identity rotation keeps them.
_TIES = [[0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0],
         [0.75, 0.5, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0],
         [-0.75, -0.5, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0],
         [0.0] * 8]


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_encode_boundary_ties_take_the_lower_code(bits):
    """A coordinate exactly on a boundary takes the lower code (docs/ops.md, tie rule), in TQEncode
    and in TQCacheUpdate, for the counting (<= 4 bits) and the binary-search (> 4 bits) paths."""
    dim = 8
    rotation, codebook = torch.eye(dim), _dyadic_codebook(bits)
    x = torch.tensor(_TIES) * torch.tensor([[1.0], [2.0], [0.5], [1.0]])  # scaled: y = x / ||x|| stays exact
    want_codes, want_norms = encode_reference(x, rotation, codebook, bits)
    boundaries = (codebook[1:] + codebook[:-1]) / 2
    y = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    ties = int((y[..., None] == boundaries).any(-1).sum())
    assert ties >= 8, f"only {ties} coordinates lie exactly on a boundary"
    codes, norms = run(make_op_model("TQEncode", head_dim=dim, bits=bits, rotation=rotation, codebooks=codebook),
                       {"x": x})
    np.testing.assert_array_equal(unpack_codes(torch.from_numpy(codes), bits, dim),
                                  unpack_codes(want_codes, bits, dim))
    np.testing.assert_array_equal(norms, want_norms.numpy())

    model = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=1, block_size=4,
                          rotation=rotation, codebooks=[codebook, codebook])
    cache = [np.zeros((2, 4, 1, ops_packed(dim, bits)), np.uint8), np.zeros((2, 4, 1), np.float32),
             np.zeros((2, 4, 1, ops_packed(dim, bits)), np.uint8), np.zeros((2, 4, 1), np.float32)]
    kv = x[:, None, :].numpy()
    outs = run(model, {"key": kv, "value": kv, "slot_mapping": np.array([0, 3, 4, 7]),
                       **dict(zip(CACHE_NAMES, cache))})
    for name in ("k_codes", "v_codes"):
        got = outs[CACHE_NAMES.index(name)].reshape(8, -1)[[0, 3, 4, 7]]
        np.testing.assert_array_equal(got, want_codes.numpy(), err_msg=name)


def ops_packed(dim: int, bits: int) -> int:
    return packed_size(dim, bits)
