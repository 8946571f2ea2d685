"""A paged cache with float16 norms (ops.py: type parameter TN) in the ONNX Runtime custom-op library
(CPU EP) against the PyTorch reference.

The cache update stores each float32 norm rounded to nearest even (+inf above float16's largest
finite value) and chooses its codes with the float32 norm, so its codes equal the reference's (up
to the rounding ties every code comparison allows) and its norms are within one float16 step (two
float32 norms 2e-6 apart may straddle a rounding midpoint). The attention ops
read a float16 norm exactly, so they meet the float32 cache's bounds (tests/test_ort_ops.py).
Inputs come from the ops' own drawers (tq_deploy.validate.inputs): stale slots, NaN norms in unused
prefill slots and junk block-table entries included.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from codes_match import assert_codes_match  # noqa: E402
from ort_support import assert_attention_close  # noqa: E402
from test_key_mean import rope_rates  # noqa: E402
from tq_deploy.export.schemas import infer_shapes  # noqa: E402
from tq_deploy.export.single_op import make_op_model  # noqa: E402
from tq_deploy.validate.inputs import CACHE_NAMES, random_inputs  # noqa: E402
from tq_deploy.validate.reference import reference_outputs as reference  # noqa: E402


@pytest.fixture(scope="module")
def library(ort_library) -> str:
    return ort_library


def run(model: onnx.ModelProto, feeds: dict, library: str) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    return dict(zip((o.name for o in session.get_outputs()), outs))


@pytest.mark.parametrize("dim,k_bits,v_bits,hkv,dtype", [(64, 5, 4, 2, "float32"), (128, 4, 4, 4, "float16"),
                                                        (72, 3, 6, 1, "float32")])
def test_cache_update_stores_float16_norms(dim, k_bits, v_bits, hkv, dtype, library, seed):
    model = make_op_model("TQCacheUpdate", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_kv_heads=hkv,
                          dtype=dtype, norm_dtype="float16")
    feeds = random_inputs(model, seed=seed, num_tokens=40)
    assert feeds["k_norms"].dtype == torch.float16
    got, want = run(model, feeds, library), reference(model, feeds)
    for name in CACHE_NAMES:
        out, ref = got[f"{name}_out"], want[f"{name}_out"].numpy()
        assert out.dtype == ref.dtype, name
        if name.endswith("norms"):  # float32 norms 2e-6 apart may round to neighbouring halves
            np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=2.0 ** -10,
                                       err_msg=name)
        else:
            assert_codes_match(torch.from_numpy(out), torch.from_numpy(ref), k_bits if name == "k_codes" else v_bits,
                               dim, name)


def test_cache_update_norm_overflow_is_inf(library, seed):
    """A norm of 1e5 (past float16's largest finite 65504) is +inf in a float16 cache (never a silent clamp), as in
    the reference."""
    model = make_op_model("TQCacheUpdate", head_dim=64, bits=4, num_kv_heads=1, norm_dtype="float16")
    feeds = random_inputs(model, seed=seed, num_tokens=4)
    feeds["key"][0] *= 1e5 / feeds["key"][0].norm()
    feeds["slot_mapping"][0] = 3
    got = run(model, feeds, library)["k_norms_out"].reshape(-1)
    assert got[3] == np.inf and reference(model, feeds)["k_norms_out"].reshape(-1)[3] == float("inf")


@pytest.mark.parametrize("op", ["TQPagedAttention", "TQPagedPrefill"])
@pytest.mark.parametrize("dim,k_bits,v_bits,hq,hkv,dtype,mean", [
    (64, 5, 4, 6, 2, "float32", False), (128, 4, 3, 8, 1, "float16", False), (64, 4, 4, 4, 4, "float32", True),
])
def test_attention_reads_float16_norms(op, dim, k_bits, v_bits, hq, hkv, dtype, mean, library, seed):
    extra = {}
    if mean:
        extra = dict(key_mean=torch.randn(hkv, dim, generator=torch.Generator().manual_seed(seed)) * 3,
                     rope_inv_freq=rope_rates(dim))
    model = make_op_model(op, head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_q_heads=hq, num_kv_heads=hkv,
                          dtype=dtype, norm_dtype="float16", **extra)
    feeds = random_inputs(model, seed=seed)
    assert feeds["v_norms"].dtype == torch.float16
    out = run(model, feeds, library)["out"]
    assert_attention_close(out, reference(model, feeds)["out"], dtype)


def test_mixed_norm_types_are_refused(library):
    """k_norms float16 beside v_norms float32: one type TN per node, named by the schemas' inference and
    matching no kernel of the library."""
    model = make_op_model("TQPagedAttention", head_dim=64, bits=4, num_q_heads=2, num_kv_heads=1,
                          norm_dtype="float16", check=False)
    v_norms = next(v for v in model.graph.input if v.name == "v_norms")
    v_norms.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    with pytest.raises(Exception, match="input v_norms has element type FLOAT, expected FLOAT16 like the other TN"):
        infer_shapes(model)
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    with pytest.raises(Exception, match="TQPagedAttention"):
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --- the CUDA EP's kernels (onnxruntime-gpu and a CUDA build of the library; skips elsewhere) ---

def run_cuda(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    from tq_deploy.runtime.session import cuda_unavailable_reason, make_session

    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    session = make_session(model.SerializeToString(), provider="cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    outs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    return dict(zip((o.name for o in session.get_outputs()), outs))


@pytest.mark.gpu
@pytest.mark.parametrize("dim,k_bits,v_bits,hkv,dtype", [(64, 5, 4, 2, "float16"), (128, 4, 4, 8, "float32")])
def test_cuda_ep_cache_update_stores_float16_norms(dim, k_bits, v_bits, hkv, dtype, seed):
    model = make_op_model("TQCacheUpdate", head_dim=dim, k_bits=k_bits, v_bits=v_bits, num_kv_heads=hkv,
                          dtype=dtype, norm_dtype="float16")
    feeds = random_inputs(model, seed=seed, num_tokens=40)
    got, want = run_cuda(model, feeds), reference(model, feeds)
    for name in ("k_norms", "v_norms"):
        out, ref = got[f"{name}_out"], want[f"{name}_out"].numpy()
        assert out.dtype == np.float16
        np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=2.0 ** -10, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["TQPagedAttention", "TQPagedPrefill"])
@pytest.mark.parametrize("dim,hq,hkv,dtype,mean", [(128, 8, 2, "float16", False), (64, 6, 2, "float16", True),
                                                   (128, 4, 1, "float32", False)])
def test_cuda_ep_attention_reads_float16_norms(op, dim, hq, hkv, dtype, mean, seed):
    """The tensor-core kernel (float16 queries) and the generic one (float32) on a float16-norm cache;
    norm-wise relative error 5e-3 as for float32 norms (tests/test_ort_cuda.py)."""
    extra = {}
    if mean:
        extra = dict(key_mean=torch.randn(hkv, dim, generator=torch.Generator().manual_seed(seed)),
                     rope_inv_freq=rope_rates(dim))
    model = make_op_model(op, head_dim=dim, k_bits=5, v_bits=4, num_q_heads=hq, num_kv_heads=hkv, dtype=dtype,
                          norm_dtype="float16", **extra)
    feeds = random_inputs(model, seed=seed)
    got = run_cuda(model, feeds)["out"].astype(np.float64)
    want = reference(model, feeds)["out"].double().numpy()
    finite = np.isfinite(want).all(axis=(1, 2))
    assert np.isfinite(got[finite]).all()
    error = np.linalg.norm(got[finite] - want[finite]) / max(np.linalg.norm(want[finite]), 1e-30)
    assert error < 5e-3, error
