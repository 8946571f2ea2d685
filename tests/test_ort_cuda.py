"""The custom-op library's CUDA EP kernels (onnxruntime-gpu) against the PyTorch reference.

Every op in a one-node model on the CUDA execution provider, on fresh random inputs and the odd
shapes of the CPU tests (context 0/1, partial last block, GQA 1/4/6/8, D 64/128/256 and odd D,
blocks 16/32/64, k_bits != v_bits, fp16 and fp32); the in-place cache update through IO binding
with device OrtValues; the whole exported decode model, also as a DecodeSession over several steps
with the cache resident on the device; bad inputs refused with the CPU kernels' messages.

Skips cleanly without a CUDA device, without onnxruntime-gpu, or with a library built without
CUDA kernels (tq_deploy.runtime.session.cuda_unavailable_reason says which).

Tolerances: codes as the CPU tests (rounding ties only); attention norm-wise relative error 5e-3
(the tensor-core kernel rounds q_rot and the centroids to fp16; the generic kernel runs in float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from test_ort_ops import (  # noqa: E402
    CACHE_NAMES,
    assert_codes_match,
    attention_inputs,
    initializers,
    random_cache,
    reference_attention,
)
from tq_deploy.export.single_op import make_op_model  # noqa: E402
from tq_deploy.ops import packed_size  # noqa: E402
from tq_deploy.reference.paged import cache_update_reference  # noqa: E402
from tq_deploy.reference.quantizer import decode_reference, encode_reference  # noqa: E402
from tq_deploy.runtime.session import cuda_unavailable_reason, make_session  # noqa: E402

pytestmark = pytest.mark.gpu
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def cuda_ep():
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)


def cuda_session(model, **kwargs):
    session = make_session(model.SerializeToString(), provider="cuda", **kwargs)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    return session


def run(model, feeds: dict) -> list[np.ndarray]:
    feeds = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}
    return cuda_session(model).run(None, feeds)


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.double().numpy()
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def node_providers(model, feeds: dict, tmp_path) -> dict:
    """op type -> the provider ORT's profile names for that node."""
    import json

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = make_session(model.SerializeToString(), provider="cuda", session_options=options)
    session.run(None, {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return {e["args"].get("op_name"): e["args"].get("provider") for e in events
            if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_the_decode_steps_turboquant_nodes_run_on_the_cuda_ep(exported_model, tmp_path, seed):
    """ORT's profile names the provider of every node: the cache update and the attention of the
    exported step are the CUDA EP's (not a CPU fallback with the cache copied around them)."""
    from tq_deploy.reference.model import example_inputs

    config, model = exported_model
    providers = node_providers(model, example_inputs(config, [3, 40], seed=seed), tmp_path)
    assert providers.get("TQCacheUpdate") == "CUDAExecutionProvider", providers
    assert providers.get("TQPagedAttention") == "CUDAExecutionProvider", providers


def test_a_lone_encode_node_runs_on_the_cuda_ep(tmp_path):
    model = make_op_model("TQEncode", head_dim=128, bits=4)
    x = np.random.default_rng(0).standard_normal((64, 128), dtype=np.float32)
    assert node_providers(model, {"x": x}, tmp_path).get("TQEncode") == "CUDAExecutionProvider"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [64, 128, 256, 72])
def test_encode_decode_match_reference(dim, bits, dtype, gen):
    model = make_op_model("TQEncode", head_dim=dim, bits=bits, dtype=dtype, leading_dims=("a", "b"),
                          seed=int(torch.randint(0, 2**30, (1,), generator=gen)))
    init = initializers(model)
    x = (torch.randn(37, 29, dim, generator=gen) * torch.rand(37, 29, 1, generator=gen) * 4)
    x[0, :3] = 0.0
    x = x.to(TORCH_DTYPES[dtype])
    codes, norms = run(model, {"x": x})
    ref_codes, ref_norms = encode_reference(x, init["rotation"], init["codebook"], bits)
    np.testing.assert_allclose(norms, ref_norms.numpy(), rtol=1e-6, atol=0)
    assert_codes_match(codes, ref_codes, bits, dim, f"TQEncode D={dim} bits={bits} {dtype} on CUDA")

    decode = make_op_model("TQDecode", head_dim=dim, bits=bits, leading_dims=("a", "b"),
                           seed=int(torch.randint(0, 2**30, (1,), generator=gen)))
    dinit = initializers(decode)
    (x_hat,) = run(decode, {"codes": ref_codes, "norms": ref_norms})
    want = decode_reference(ref_codes, ref_norms, dinit["rotation"], dinit["codebook"], bits).numpy()
    assert x_hat.shape == (37, 29, dim)
    assert np.abs(x_hat - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(
    "dim,k_bits,v_bits,hkv,block_size,dtype",
    [(128, 4, 4, 2, 16, "float32"), (64, 2, 3, 4, 32, "float32"), (256, 3, 1, 1, 16, "float16"),
     (128, 6, 4, 8, 16, "float16"), (72, 3, 3, 2, 64, "float32"), (128, 8, 2, 1, 16, "float32")],
)
def test_cache_update_matches_reference(dim, k_bits, v_bits, hkv, block_size, dtype, gen):
    model = make_op_model("TQCacheUpdate", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_kv_heads=hkv,
                          block_size=block_size, dtype=dtype)
    init = initializers(model)
    n, t = 9, 40
    cache = random_cache(gen, n, block_size, hkv, dim, k_bits, v_bits)
    slots = torch.randperm(n * block_size, generator=gen)[:t].long()
    slots[torch.randperm(t, generator=gen)[:7]] = -1
    slots[0] = 0
    slots[5] = slots[30] if slots[30] >= 0 else 3  # a duplicate: the last writer wins
    key = torch.randn(t, hkv, dim, generator=gen).to(TORCH_DTYPES[dtype])
    value = (torch.randn(t, hkv, dim, generator=gen) * 3).to(TORCH_DTYPES[dtype])
    outs = run(model, {"key": key, "value": value, "slot_mapping": slots, **dict(zip(CACHE_NAMES, cache))})
    ref = cache_update_reference(key, value, slots, *[c.clone() for c in cache], init["rotation"],
                                 init["k_codebook"], init["v_codebook"], k_bits, v_bits)
    for name, out, want in zip(CACHE_NAMES, outs, ref):
        if name.endswith("norms"):
            np.testing.assert_allclose(out, want.numpy(), rtol=1e-6, err_msg=name)
        else:
            bits = k_bits if name == "k_codes" else v_bits
            assert_codes_match(out, want, bits, dim, f"TQCacheUpdate {name} on CUDA")


ATTENTION_CASES = [
    # dim, k_bits, v_bits, hq, hkv, block_size, dtype
    (64, 2, 2, 4, 4, 16, "float32"),    # GQA 1
    (128, 3, 3, 8, 2, 16, "float32"),   # GQA 4
    (256, 4, 4, 8, 1, 32, "float32"),   # GQA 8
    (128, 4, 2, 12, 2, 64, "float16"),  # GQA 6, block 64
    (128, 6, 4, 32, 8, 16, "float16"),  # k6v4
    (128, 8, 4, 32, 8, 16, "float16"),  # k8v4
    (72, 3, 2, 6, 3, 16, "float32"),    # D 72: codes widened on the tensor-core kernel
    (320, 4, 3, 4, 2, 16, "float32"),   # D 320: the generic kernel
    (64, 5, 3, 8, 1, 32, "float16"),    # 5-bit keys, 8 query heads per KV head
    (128, 4, 4, 8, 2, 16, "float16"),
    (128, 4, 4, 32, 2, 8, "float16"),   # 16 query heads per KV head (two chunks), block 8
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
    want = reference_attention(feeds, init, k_bits, v_bits)
    assert out.shape == (len(context_lens), hq, dim) and out.dtype == np.dtype(dtype)
    assert np.isfinite(out).all() and (out[5] == 0).all()  # context 0 gives zeros
    assert relative_error(out, want) < 5e-3


def test_paged_attention_explicit_scale_and_non_contiguous_source_tables(gen):
    model = make_op_model("TQPagedAttention", head_dim=128, bits=4, num_q_heads=32, num_kv_heads=8, scale=0.07)
    init = initializers(model)
    feeds = attention_inputs(gen, dim=128, k_bits=4, v_bits=4, hq=32, hkv=8, block_size=16,
                             context_lens=[2000, 17, 1])
    feeds["block_tables"] = torch.from_numpy(np.asfortranarray(feeds["block_tables"].numpy()))
    (out,) = run(model, feeds)
    assert relative_error(out, reference_attention(feeds, init, 4, 4, scale=0.07)) < 5e-3


def test_cache_update_in_place_on_the_device_through_io_binding(gen):
    """Device OrtValues bound as both the cache input and its output: written in place, no copy."""
    dim, bits, hkv, block = 128, 4, 2, 16
    model = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=block)
    init = initializers(model)
    session = cuda_session(model)
    cache = random_cache(gen, 6, block, hkv, dim, bits, bits)
    device = {n: ort.OrtValue.ortvalue_from_numpy(c.numpy(), "cuda", 0) for n, c in zip(CACHE_NAMES, cache)}
    pointers = {n: v.data_ptr() for n, v in device.items()}
    slots = torch.tensor([3, 40, -1, 0, 95], dtype=torch.int64)
    key = torch.randn(5, hkv, dim, generator=gen)
    value = torch.randn(5, hkv, dim, generator=gen)
    binding = session.io_binding()
    binding.bind_cpu_input("key", key.numpy())
    binding.bind_cpu_input("value", value.numpy())
    binding.bind_cpu_input("slot_mapping", slots.numpy())
    for name, v in device.items():
        binding.bind_ortvalue_input(name, v)
        binding.bind_ortvalue_output(f"{name}_out", v)
    session.run_with_iobinding(binding)
    ref = cache_update_reference(key, value, slots, *[c.clone() for c in cache], init["rotation"],
                                 init["k_codebook"], init["v_codebook"], bits, bits)
    for (name, v), want in zip(device.items(), ref):
        assert v.data_ptr() == pointers[name]
        got = v.numpy()
        if name.endswith("norms"):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, err_msg=name)
        else:
            assert_codes_match(got, want, bits, dim, name)


def test_an_output_bound_to_another_cache_input_is_refused(gen):
    """k_codes_out bound to the v_codes buffer would corrupt the value cache: refused, named."""
    dim, bits, hkv, block = 64, 4, 1, 16
    model = make_op_model("TQCacheUpdate", head_dim=dim, bits=bits, num_kv_heads=hkv, block_size=block)
    session = cuda_session(model)
    cache = random_cache(gen, 3, block, hkv, dim, bits, bits)
    device = {n: ort.OrtValue.ortvalue_from_numpy(c.numpy(), "cuda", 0) for n, c in zip(CACHE_NAMES, cache)}
    binding = session.io_binding()
    binding.bind_cpu_input("key", np.zeros((1, hkv, dim), np.float32))
    binding.bind_cpu_input("value", np.zeros((1, hkv, dim), np.float32))
    binding.bind_cpu_input("slot_mapping", np.array([2], np.int64))
    for name, v in device.items():
        binding.bind_ortvalue_input(name, v)
    binding.bind_ortvalue_output("k_codes_out", device["v_codes"])
    for name in CACHE_NAMES[1:]:
        binding.bind_ortvalue_output(f"{name}_out", device[name])
    with pytest.raises(Exception, match="k_codes_out"):
        session.run_with_iobinding(binding)


@pytest.mark.parametrize("case", ["wrong_packed_size", "wrong_codebook", "heads_not_multiple"])
def test_bad_shapes_are_refused_like_on_the_cpu(case, gen):
    """Shape errors are host-side checks shared with the CPU kernels: the same message."""
    dim, hq, hkv = 64, 4, 2
    model = make_op_model("TQPagedAttention", head_dim=dim, bits=3, num_q_heads=hq, num_kv_heads=hkv)
    feeds = attention_inputs(gen, dim=dim, k_bits=3, v_bits=3, hq=hq, hkv=hkv, block_size=16, context_lens=[5])
    from test_ort_ops import loosen

    loose = loosen(model)
    init = initializers(model)
    feeds.update({k: v for k, v in init.items()})
    if case == "wrong_packed_size":
        feeds["k_codes"] = feeds["k_codes"][..., :-1].contiguous()
        fragment = "k_codes"
    elif case == "wrong_codebook":
        feeds["k_codebook"] = feeds["k_codebook"][:4].contiguous()
        fragment = "k_codebook"
    else:
        feeds["query"] = torch.randn(1, 3, dim)
        fragment = "query"
    messages = []
    for provider in ("cpu", "cuda"):
        session = make_session(loose.SerializeToString(), provider=provider)
        with pytest.raises(Exception) as info:
            session.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert fragment in str(info.value)
        messages.append(str(info.value).split("TQPagedAttention", 1)[-1])
    assert messages[0] == messages[1]


# --------------------------------------------------------------------------------------------
# the whole exported model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_model():
    from tq_deploy.export import export_model
    from tq_deploy.reference.model import TQModelConfig

    config = TQModelConfig(hidden_size=256, num_q_heads=8, num_kv_heads=2, head_dim=128, k_bits=4, v_bits=3,
                           block_size=16, num_blocks=64, max_blocks_per_seq=12, seed=7)
    return config, export_model(config)


def test_exported_model_matches_reference_on_the_cuda_ep(exported_model, seed):
    from tq_deploy.reference.model import example_inputs
    from tq_deploy.runtime.session import run as run_session
    from tq_deploy.validate.reference import reference_outputs

    config, model = exported_model
    session = cuda_session(model)
    inputs = example_inputs(config, [1, 15, 17, 150], seed=seed)
    got = run_session(session, inputs)
    want = reference_outputs(model, inputs)
    assert relative_error(got["out"], want["out"]) < 5e-3
    np.testing.assert_allclose(got["k_norms_out"], want["k_norms_out"].numpy(), rtol=1e-5)
    assert_codes_match(got["k_codes_out"], want["k_codes_out"], config.k_bits, config.head_dim, "k_codes_out")
    assert_codes_match(got["v_codes_out"], want["v_codes_out"], config.v_bits, config.head_dim, "v_codes_out")


def test_decode_session_keeps_the_cache_on_the_device(exported_model, seed, tmp_path):
    """Several steps through a DecodeSession (cache resident, bound in place) equal the reference
    stepping its own cache, and no step copies cache bytes between host and device."""
    from tq_deploy.reference.model import example_inputs
    from tq_deploy.runtime.decode_session import DecodeSession, copied_bytes
    from tq_deploy.validate.reference import reference_outputs

    config, model = exported_model
    step = DecodeSession(model, provider="cuda", profile=True, profile_prefix=str(tmp_path / "step"))
    inputs = example_inputs(config, [5, 40], seed=seed)
    caches = {n: inputs[n] for n in CACHE_NAMES}
    step.load_cache({n: c.numpy() for n, c in caches.items()})
    b = config.block_size
    for k in range(4):
        want = reference_outputs(model, {**inputs, **caches})
        got = step.run(*(inputs[n].numpy() for n in ("hidden", "positions", "slot_mapping", "block_tables",
                                                     "context_lens")))
        assert relative_error(got, want["out"]) < 5e-3, f"step {k}"
        caches = {n: want[f"{n}_out"] for n in CACHE_NAMES}
        inputs["positions"] = inputs["positions"] + 1
        inputs["context_lens"] = inputs["context_lens"] + 1
        inputs["slot_mapping"] = torch.stack([inputs["block_tables"][s, int(p) // b].long() * b + int(p) % b
                                              for s, p in enumerate(inputs["positions"])])
        inputs["hidden"] = torch.randn(inputs["hidden"].shape, generator=torch.Generator().manual_seed(seed + k))
    resident = step.read_cache()
    for name in ("k_norms", "v_norms"):
        np.testing.assert_allclose(resident[name], caches[name].numpy(), rtol=1e-5)
    moved = copied_bytes(step.end_profiling())
    assert moved["to_device"] + moved["to_host"] < step.cache_bytes() // 100, moved


def test_decode_session_as_cuda_graphs_equals_the_plain_session(exported_model, seed):
    """cuda_graph=True: ONNX Runtime captures the step once per shape and replays it; every step,
    including a change of batch and back (a second graph, then the first one replayed), gives the
    outputs and caches of the same session without graphs, bit for bit."""
    from tq_deploy.reference.model import example_inputs
    from tq_deploy.runtime.decode_session import DecodeSession

    config, model = exported_model
    plain, graphed = DecodeSession(model, provider="cuda"), DecodeSession(model, provider="cuda", cuda_graph=True)
    inputs = example_inputs(config, [5, 40, 70], seed=seed)
    for s in (plain, graphed):
        s.load_cache({n: inputs[n].numpy() for n in CACHE_NAMES})
    names = ("hidden", "positions", "slot_mapping", "block_tables", "context_lens")
    b = config.block_size
    gen = torch.Generator().manual_seed(seed)
    for k, batch in enumerate((3, 3, 3, 3, 1, 1, 1, 3, 3)):
        feeds = [inputs[n][:batch].numpy() for n in names]
        want, got = plain.run(*feeds), graphed.run(*feeds)
        np.testing.assert_array_equal(got, want, err_msg=f"step {k} (batch {batch})")
        advanced = inputs["positions"][:batch] + 1
        inputs["positions"][:batch] = advanced
        inputs["context_lens"][:batch] += 1
        inputs["slot_mapping"][:batch] = torch.stack([inputs["block_tables"][s, int(p) // b].long() * b + int(p) % b
                                                      for s, p in enumerate(advanced)])
        inputs["hidden"] = torch.randn(inputs["hidden"].shape, generator=gen)
    assert len(graphed._graphs) == 2
    for name, value in plain.read_cache().items():
        np.testing.assert_array_equal(graphed.read_cache()[name], value, err_msg=name)
