"""The attention ops' optional key mean (tq_deploy/ops.py: key_mean, rope_inv_freq).

A cache may hold its keys at positions t >= 1 without R_t mu (mu: a fixed per-KV-head mean taken
before RoPE); the attention adds <q, R_t mu> back to those scores. The oracle here decodes every
key, turns mu by RoPE itself (``rope_turned``, the rotate-half form) and adds it to the keys at
t >= 1 before plain softmax attention: it shares no code with the A/B form the kernels use.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from tq_deploy import dispatch
from tq_deploy.export.single_op import make_op_model
from tq_deploy.reference import checks
from tq_deploy.reference.paged import (
    dense_attention_reference,
    paged_attention_reference,
    paged_prefill_reference,
    rope_turned,
)
from tq_deploy.validate.inputs import CACHE_NAMES, random_inputs

ATTENTION_ARGS = ("query", *CACHE_NAMES, "block_tables", "context_lens")
PREFILL_ARGS = (*ATTENTION_ARGS, "query_start")


def rope_rates(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def mean_model(op: str, dim: int, hq: int, hkv: int, k_bits: int, v_bits: int, seed: int, dtype="float32",
               block_size=16, magnitude=3.0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(hkv, dim, generator=gen) * magnitude
    model = make_op_model(op, head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq, num_kv_heads=hkv,
                          block_size=block_size, key_mean=mean, rope_inv_freq=rope_rates(dim), dtype=dtype,
                          seed=seed)
    return model, mean


def initializers(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def attention_call(model, feeds, k_bits, v_bits, names=ATTENTION_ARGS):
    init = initializers(model)
    return [*(feeds[n] for n in names), init["rotation"], init["k_codebook"], init["v_codebook"], k_bits, v_bits]


@pytest.mark.parametrize("dim,hq,hkv,k_bits,v_bits,block", [
    (64, 8, 2, 4, 3, 16), (128, 6, 1, 3, 4, 32), (64, 4, 4, 2, 2, 64), (256, 8, 1, 4, 4, 16), (128, 8, 8, 5, 1, 16),
])
def test_reference_adds_the_turned_mean_back(seed, dim, hq, hkv, k_bits, v_bits, block):
    model, mean = mean_model("TQPagedAttention", dim, hq, hkv, k_bits, v_bits, seed, block_size=block)
    feeds = random_inputs(model, seed=seed, context_lens=[0, 1, 2, block + 3, 3 * block])
    call = attention_call(model, feeds, k_bits, v_bits)
    got = paged_attention_reference(*call, 0.0, mean, rope_rates(dim))
    oracle = dense_attention_reference(*call, 0.0, mean, rope_rates(dim))
    torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-5 * float(oracle.abs().max()))
    plain = paged_attention_reference(*call)
    assert float((got - plain)[2:].abs().max()) > 1e-2, "the mean changed nothing: not applied"
    # context 0 gives zeros; context 1 attends to the position-0 key alone, which keeps its mean
    assert float(got[0].abs().max()) == 0.0
    torch.testing.assert_close(got[1], plain[1])


def test_rope_turned_is_rotate_half_rope():
    """R_t x with the rotate-half convention of Llama-family models (t * w_j turns pair (j, j + D/2))."""
    x = torch.randn(2, 8)
    w = rope_rates(8)
    t = torch.tensor([0, 3, 17])
    angle = t[:, None].float() * torch.cat([w, w])[None, :]
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    expected = x[None] * torch.cos(angle)[:, None, :] + rotate_half[None] * torch.sin(angle)[:, None, :]
    torch.testing.assert_close(rope_turned(x, w, t), expected)
    torch.testing.assert_close(rope_turned(x, w, t)[0], x)


def test_prefill_rows_are_decode_queries_of_their_prefixes(seed):
    dim, hq, hkv, k_bits, v_bits = 64, 6, 2, 4, 2
    model, mean = mean_model("TQPagedPrefill", dim, hq, hkv, k_bits, v_bits, seed)
    feeds = random_inputs(model, seed=seed)
    call = attention_call(model, feeds, k_bits, v_bits, PREFILL_ARGS)
    rates = rope_rates(dim)
    out = paged_prefill_reference(*call, 0.0, mean, rates)
    starts, lens = feeds["query_start"].tolist(), feeds["context_lens"].tolist()
    for s in range(len(lens)):
        n = starts[s + 1] - starts[s]
        for j in range(n):
            row = starts[s] + j
            single = paged_attention_reference(
                feeds["query"][row:row + 1], *(feeds[n_] for n_ in CACHE_NAMES), feeds["block_tables"][s:s + 1],
                torch.tensor([lens[s] - n + j + 1], dtype=torch.int32), *call[-5:], 0.0, mean, rates)
            torch.testing.assert_close(out[row:row + 1], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key_mean,rates,match", [
    (torch.zeros(2, 64), None, "key_mean is given and rope_inv_freq is None, expected both or neither"),
    (None, torch.zeros(32), "rope_inv_freq is given and key_mean is None"),
    (torch.zeros(3, 64), torch.zeros(32), r"key_mean.shape"),
    (torch.zeros(2, 64), torch.zeros(64), r"rope_inv_freq.shape"),
    (torch.zeros(2, 64, dtype=torch.float16), torch.zeros(32), r"key_mean.dtype"),
    (torch.full((2, 64), float("nan")), torch.zeros(32), "key_mean holds a non-finite value"),
    (torch.zeros(2, 64), torch.full((32,), float("inf")), "rope_inv_freq holds a non-finite value"),
])
def test_reference_refuses_a_bad_key_mean(key_mean, rates, match):
    model = make_op_model("TQPagedAttention", head_dim=64, k_bits=3, v_bits=2, num_q_heads=4, num_kv_heads=2)
    feeds = random_inputs(model, seed=0)
    with pytest.raises(ValueError, match=match):
        paged_attention_reference(*attention_call(model, feeds, 3, 2), 0.0, key_mean, rates)


def test_dispatch_passes_the_mean_to_whichever_backend_runs(seed):
    model, mean = mean_model("TQPagedAttention", 64, 4, 2, 4, 4, seed)
    feeds = random_inputs(model, seed=seed)
    call = attention_call(model, feeds, 4, 4)
    expected = paged_attention_reference(*call, 0.0, mean, rope_rates(64))
    torch.testing.assert_close(dispatch.paged_attention(*call, 0.0, mean, rope_rates(64)), expected)
    plan = dispatch.plan_paged_attention(*call, 0.0, mean, rope_rates(64))
    torch.testing.assert_close(plan.run(feeds["query"], feeds["block_tables"], feeds["context_lens"]), expected)


def test_a_node_may_leave_the_mean_out_or_take_it():
    with_mean, _ = mean_model("TQPagedAttention", 64, 4, 2, 3, 2, 0)
    without = make_op_model("TQPagedAttention", head_dim=64, k_bits=3, v_bits=2)
    assert list(with_mean.graph.node[0].input)[-2:] == ["key_mean", "rope_inv_freq"]
    assert len(without.graph.node[0].input) == 10
    for model in (with_mean, without):
        onnx.checker.check_model(model, full_check=True)
    with pytest.raises(ValueError, match="expected an attention op"):
        make_op_model("TQEncode", head_dim=64, bits=3, key_mean=torch.zeros(1, 64), rope_inv_freq=torch.zeros(32))
    with pytest.raises(ValueError, match=r"rope_inv_freq.shape=\(31,\)"):
        make_op_model("TQPagedAttention", head_dim=64, k_bits=3, v_bits=2, key_mean=torch.zeros(2, 64),
                      rope_inv_freq=torch.zeros(31))


# ---------------------------------------------------------------------------------- ONNX Runtime CPU


def ort_session(model: onnx.ModelProto, library: str):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def assert_matches(out: np.ndarray, expected: torch.Tensor, dtype: str) -> None:
    ref = expected.float().numpy()
    scale = float(np.abs(ref).max())
    if dtype == "float16":
        np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * scale)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("op,dim,hq,hkv,k_bits,v_bits,dtype", [
    ("TQPagedAttention", 64, 8, 2, 4, 3, "float32"),
    ("TQPagedAttention", 128, 6, 1, 3, 4, "float16"),
    ("TQPagedAttention", 256, 4, 4, 2, 5, "float32"),
    ("TQPagedPrefill", 64, 4, 1, 4, 4, "float32"),
    ("TQPagedPrefill", 128, 8, 2, 2, 3, "float16"),
])
def test_ort_cpu_matches_the_reference(ort_library, seed, op, dim, hq, hkv, k_bits, v_bits, dtype):
    model, mean = mean_model(op, dim, hq, hkv, k_bits, v_bits, seed, dtype=dtype)
    feeds = random_inputs(model, seed=seed, **({"context_lens": [0, 1, 17, 90]} if op == "TQPagedAttention" else {}))
    names = ATTENTION_ARGS if op == "TQPagedAttention" else PREFILL_ARGS
    reference = paged_attention_reference if op == "TQPagedAttention" else paged_prefill_reference
    expected = reference(*attention_call(model, feeds, k_bits, v_bits, names), 0.0, mean, rope_rates(dim))
    out = ort_session(model, ort_library).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert_matches(out, expected, dtype)


def test_ort_cpu_portable_kernels_match_the_reference(ort_library, seed):
    """The non-AVX2 path, forced with TQ_DEPLOY_CPU_KERNELS=portable in a fresh process."""
    script = (
        "import sys, numpy as np, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_key_mean as t\n"
        f"for op in ('TQPagedAttention', 'TQPagedPrefill'):\n"
        f"    model, mean = t.mean_model(op, 64, 4, 2, 4, 3, {seed})\n"
        f"    feeds = t.random_inputs(model, seed={seed})\n"
        "    names = t.ATTENTION_ARGS if op == 'TQPagedAttention' else t.PREFILL_ARGS\n"
        "    ref = t.paged_attention_reference if op == 'TQPagedAttention' else t.paged_prefill_reference\n"
        "    expected = ref(*t.attention_call(model, feeds, 4, 3, names), 0.0, mean, t.rope_rates(64))\n"
        f"    out = t.ort_session(model, {ort_library!r}).run(None, {{k: v.numpy() for k, v in feeds.items()}})[0]\n"
        "    t.assert_matches(out, expected, 'float32')\n"
    )
    env = {**__import__("os").environ, "TQ_DEPLOY_CPU_KERNELS": "portable"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def node_with_inputs(model: onnx.ModelProto, names: list[str], as_graph_inputs: dict[str, tuple]) -> onnx.ModelProto:
    """``model`` with its node's inputs replaced by ``names``; ``as_graph_inputs`` become float graph inputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = model.graph.node[0]
    del node.input[:]
    node.input.extend(names)
    kept = [t for t in model.graph.initializer if t.name not in as_graph_inputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, shape in as_graph_inputs.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
    return model


def test_ort_refuses_a_bad_key_mean_with_one_line(ort_library):
    ort = pytest.importorskip("onnxruntime")
    model, mean = mean_model("TQPagedAttention", 64, 4, 2, 3, 2, 0)
    feeds = {k: v.numpy() for k, v in random_inputs(model, seed=0).items()}
    base = [i for i in model.graph.node[0].input][:10]

    alone = node_with_inputs(model, base + ["key_mean"], {})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="input key_mean is given without rope_inv_freq, expected both or neither"):
        ort_session(alone, ort_library).run(None, feeds)

    fed = node_with_inputs(model, base + ["key_mean", "rope_inv_freq"], {"key_mean": (2, 64), "rope_inv_freq": (None,)})
    session = ort_session(fed, ort_library)
    good = {"key_mean": mean.numpy(), "rope_inv_freq": rope_rates(64).numpy()}
    session.run(None, {**feeds, **good})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=r"rope_inv_freq has shape \[31\]"):
        session.run(None, {**feeds, **good, "rope_inv_freq": good["rope_inv_freq"][:31]})
    bad = good["key_mean"].copy()
    bad[1, 5] = math.nan
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="input key_mean holds nan at 69, expected finite float32 values"):
        session.run(None, {**feeds, **good, "key_mean": bad})
