"""TQPagedPrefill in the ONNX Runtime custom-op library (CPU EP) against the PyTorch reference.

One-node models from tq_deploy.export.single_op; inputs from the op's own drawer
(tq_deploy.validate.inputs.paged_prefill_inputs): NaN norms and random codes in every slot no
context covers, junk block-table entries past each sequence's blocks, a sequence with no new token,
one-token prompts, a chunk crossing a block boundary and a chunk that is its whole context.

Bounds as for TQPagedAttention (tests/test_ort_ops.py): float32 |out - ref| <= 1e-4 |ref| + 1e-5
max|ref| elementwise; float16 rtol 2e-3, atol 2e-3 max|ref|.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from ort_support import assert_attention_close, assert_passes_on_portable_kernels  # noqa: E402
from tq_deploy.export.single_op import make_op_model  # noqa: E402
from tq_deploy.reference.paged import paged_attention_reference, paged_prefill_reference  # noqa: E402
from tq_deploy.validate.inputs import CACHE_NAMES, model_initializers, random_inputs  # noqa: E402

ARGS = ("query", *CACHE_NAMES, "block_tables", "context_lens", "query_start")


@pytest.fixture(scope="module")
def library(ort_library) -> str:
    return ort_library


def session(model: onnx.ModelProto, library: str):
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model, feeds, library):
    return session(model, library).run(None, {k: v.numpy() for k, v in feeds.items()})


def reference(model, feeds, k_bits, v_bits, scale=0.0):
    init = model_initializers(model)
    return paged_prefill_reference(*(feeds[n] for n in ARGS), init["rotation"], init["k_codebook"],
                                   init["v_codebook"], k_bits, v_bits, scale)


CASES = [
    # dim, k_bits, v_bits, hq, hkv, block_size, dtype
    (64, 4, 4, 4, 4, 16, "float32"),    # GQA 1
    (128, 3, 2, 6, 2, 16, "float32"),   # GQA 3, k_bits != v_bits
    (64, 2, 5, 8, 2, 32, "float32"),    # GQA 4, k_bits < v_bits, blocks of 32
    (128, 4, 3, 8, 2, 32, "float16"),   # GQA 4
    (64, 1, 8, 3, 1, 16, "float16"),    # GQA 3
    (72, 3, 6, 4, 1, 16, "float32"),    # D not a multiple of 8, 3/6-bit groups
]


@pytest.mark.parametrize("dim,k_bits,v_bits,hq,hkv,block_size,dtype", CASES)
def test_paged_prefill_matches_reference(dim, k_bits, v_bits, hq, hkv, block_size, dtype, library, seed):
    model = make_op_model("TQPagedPrefill", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq,
                          num_kv_heads=hkv, block_size=block_size, dtype=dtype)
    feeds = random_inputs(model, seed=seed)
    (out,) = run(model, feeds, library)
    assert out.shape == tuple(feeds["query"].shape)
    assert_attention_close(out, reference(model, feeds, k_bits, v_bits), dtype)


def test_long_chunks_over_many_threads_and_a_scale(library, seed):
    """Chunks of tens of rows (several tasks per sequence, several 32-token tiles per task) and a scale."""
    model = make_op_model("TQPagedPrefill", head_dim=64, k_bits=3, v_bits=4, num_q_heads=8, num_kv_heads=2,
                          block_size=16, scale=0.3)
    feeds = random_inputs(model, seed=seed, context_lens=[130, 77, 5], num_tokens=70)
    assert feeds["query_start"].tolist() == [0, 70, 140, 145]
    (out,) = run(model, feeds, library)
    assert_attention_close(out, reference(model, feeds, 3, 4, 0.3), "float32")


def test_one_row_per_sequence_is_the_decode_op(library, seed):
    """n_s = 1 everywhere: TQPagedPrefill's output is TQPagedAttention's, kernel for kernel."""
    prefill = make_op_model("TQPagedPrefill", head_dim=128, k_bits=4, v_bits=2, num_q_heads=8, num_kv_heads=2,
                            block_size=16)
    decode = make_op_model("TQPagedAttention", head_dim=128, k_bits=4, v_bits=2, num_q_heads=8, num_kv_heads=2,
                           block_size=16)
    lens = [1, 16, 17, 70]
    feeds = random_inputs(prefill, seed=seed, context_lens=lens, num_tokens=1)
    (got,) = run(prefill, feeds, library)
    (want,) = run(decode, {k: v for k, v in feeds.items() if k != "query_start"}, library)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    init = model_initializers(decode)
    ref = paged_attention_reference(*(feeds[n] for n in ARGS[:-1]), init["rotation"], init["k_codebook"],
                                    init["v_codebook"], 4, 2)
    assert_attention_close(got, ref, "float32")


def test_no_query_rows(library, seed):
    model = make_op_model("TQPagedPrefill", head_dim=64, bits=2, num_q_heads=2, num_kv_heads=1)
    feeds = random_inputs(model, seed=seed, context_lens=[3, 0], num_tokens=0)
    (out,) = run(model, feeds, library)
    assert out.shape == (0, 2, 64)


def _feeds(library, seed):
    model = make_op_model("TQPagedPrefill", head_dim=64, k_bits=3, v_bits=3, num_q_heads=4, num_kv_heads=2,
                          block_size=16)
    return session(model, library), random_inputs(model, seed=seed, context_lens=[20, 5, 9], num_tokens=6)


BAD = {
    "first": (lambda f: f["query_start"].__setitem__(0, 1), "query_start runs from 1 to 17"),
    "last": (lambda f: f["query_start"].__setitem__(-1, 16), "expected 0 to T = query.shape[0] = 17"),
    "decreasing": (lambda f: f["query_start"].__setitem__(1, 12), "query_start[2]=11 < query_start[1]=12"),
    "too-many-rows": (lambda f: f["query_start"].__setitem__(2, 6),
                      "sequence 2 has 11 query rows (query_start), expected <= context_lens[2] = 9"),
    "context": (lambda f: f["context_lens"].__setitem__(0, 999), "context_lens[0]=999"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_data_is_refused_naming_the_input(name, library, seed):
    sess, feeds = _feeds(library, seed)
    assert feeds["query_start"].tolist() == [0, 6, 11, 17]
    mutate, message = BAD[name]
    mutate(feeds)
    with pytest.raises(Exception) as info:
        sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert "TQPagedPrefill" in str(info.value) and message in str(info.value), str(info.value)


def test_query_start_of_the_wrong_length_is_refused(library, seed):
    model = make_op_model("TQPagedPrefill", head_dim=64, bits=3, num_q_heads=4, num_kv_heads=2)
    feeds = random_inputs(model, seed=seed, context_lens=[20, 5, 9], num_tokens=6)
    feeds["query_start"] = feeds["query_start"][:3]
    with pytest.raises(Exception) as info:
        session(model, library).run(None, {k: v.numpy() for k, v in feeds.items()})
    assert "input query_start has shape [3], expected [S+1] = [4]" in str(info.value), str(info.value)


def test_chunked_prefill_graph_writes_then_attends(library, seed):
    """TQCacheUpdate then TQPagedPrefill in one graph, the order of a real model's chunk: the
    chunk's keys and values go to the cache first, then its rows attend to the cache causally."""
    from onnx import TensorProto, helper

    from tq_deploy.export.common import finish_model, read_metadata
    from tq_deploy.validate.inputs import paged_prefill_inputs

    dim, hq, hkv, b, bits = 64, 4, 2, 16, 4
    update = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=b)
    prefill = make_op_model("TQPagedPrefill", head_dim=dim, bits=bits, num_q_heads=hq, num_kv_heads=hkv, block_size=b)
    gen = torch.Generator().manual_seed(seed)
    feeds = paged_prefill_inputs(read_metadata(prefill)[1], model_initializers(prefill), gen, context_lens=[40, 7],
                                 query_lens=[12, 7])
    key = torch.randn(19, hkv, dim, generator=gen)
    value = torch.randn(19, hkv, dim, generator=gen)
    rows = [(0, 28 + j) for j in range(12)] + [(1, j) for j in range(7)]  # (sequence, position)
    slots = torch.tensor([int(feeds["block_tables"][s, p // b]) * b + p % b for s, p in rows])

    nodes = [helper.make_node("TQCacheUpdate", ["key", "value", "slot_mapping", *CACHE_NAMES, "rotation",
                                                "k_codebook", "v_codebook"], [f"{n}_out" for n in CACHE_NAMES],
                              domain="turboquant", k_bits=bits, v_bits=bits),
             helper.make_node("TQPagedPrefill", ["query", *(f"{n}_out" for n in CACHE_NAMES), "block_tables",
                                                 "context_lens", "query_start", "rotation", "k_codebook",
                                                 "v_codebook"], ["out"], domain="turboquant", k_bits=bits,
                              v_bits=bits)]
    inputs = [*update.graph.input, *(v for v in prefill.graph.input if v.name not in {i.name for i in update.graph.input})]
    graph = helper.make_graph(nodes, "chunk", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                      ["num_tokens", hq, dim])],
                              list(prefill.graph.initializer))
    model = finish_model(graph, "op", {"op": "chunk"})
    onnx.checker.check_model(model)
    all_feeds = {**feeds, "key": key, "value": value, "slot_mapping": slots}
    (out,) = session(model, library).run(None, {k: v.numpy() for k, v in all_feeds.items()})

    from tq_deploy.reference.paged import cache_update_reference

    init = model_initializers(prefill)
    caches = [feeds[n].clone() for n in CACHE_NAMES]
    cache_update_reference(key, value, slots, *caches, init["rotation"], init["k_codebook"], init["v_codebook"],
                           bits, bits)
    updated = dict(feeds, **dict(zip(CACHE_NAMES, caches)))
    assert_attention_close(out, reference(prefill, updated, bits, bits), "float32")


def test_portable_kernels_match_reference(library):
    """The portable (non-AVX2) prefill path, forced with TQ_DEPLOY_CPU_KERNELS=portable in a fresh process."""
    selection = "test_paged_prefill_matches_reference and (128-3-2 or 72-3-6) or test_long_chunks"
    assert_passes_on_portable_kernels(__file__, library, selection, passed=3)


def _cuda_ep():
    from tq_deploy.runtime.session import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
def test_cuda_session_runs_the_prefill_node(tmp_path, seed):
    """A CUDA-EP session of a prefill model gives the reference's answer (through the CUDA kernel)."""
    from tq_deploy.runtime.session import make_session

    _cuda_ep()
    model = make_op_model("TQPagedPrefill", head_dim=128, k_bits=4, v_bits=3, num_q_heads=8, num_kv_heads=2)
    feeds = random_inputs(model, seed=seed)
    sess = make_session(model.SerializeToString(), provider="cuda")
    (out,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert_attention_close(out, reference(model, feeds, 4, 3), "float32")


@pytest.mark.gpu
def test_the_prefill_node_runs_on_the_cuda_ep(tmp_path, seed):
    from test_ort_cuda import node_providers

    _cuda_ep()
    model = make_op_model("TQPagedPrefill", head_dim=128, bits=4, num_q_heads=8, num_kv_heads=2)
    providers = node_providers(model, random_inputs(model, seed=seed), tmp_path)
    assert providers.get("TQPagedPrefill") == "CUDAExecutionProvider", providers
