"""DecodeSession: the exported decode step with its paged cache resident in the session and
updated in place (IO binding), stepped like a server would, against the PyTorch reference
stepping its own cache. CPU here; tests/test_ort_cuda.py runs it on the CUDA EP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from codes_match import assert_codes_match  # noqa: E402

from tq_deploy.reference.model import TQModelConfig, example_inputs  # noqa: E402
from tq_deploy.runtime.library import NativeLibraryNotFoundError, locate  # noqa: E402

CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")
STEP = ("hidden", "positions", "slot_mapping", "block_tables", "context_lens")

try:
    locate("ort")
except NativeLibraryNotFoundError as err:  # pragma: no cover - depends on the build
    pytest.skip(f"custom-op library not built: {err}", allow_module_level=True)


@pytest.fixture(scope="module")
def exported():
    from tq_deploy.export import export_model

    config = TQModelConfig(hidden_size=128, num_q_heads=4, num_kv_heads=2, head_dim=64, k_bits=4, v_bits=2,
                           block_size=16, num_blocks=20, max_blocks_per_seq=6, seed=5)
    return config, export_model(config)


def next_step(inputs: dict, block_size: int, gen) -> dict:
    step = dict(inputs)
    step["positions"] = inputs["positions"] + 1
    step["context_lens"] = inputs["context_lens"] + 1
    step["slot_mapping"] = torch.stack([inputs["block_tables"][s, int(p) // block_size].long() * block_size
                                        + int(p) % block_size for s, p in enumerate(step["positions"])])
    step["hidden"] = torch.randn(inputs["hidden"].shape, generator=gen)
    return step


def test_steps_match_the_reference_and_the_cache_stays_in_place(exported, seed):
    from tq_deploy.runtime.decode_session import DecodeSession
    from tq_deploy.validate.reference import reference_outputs

    config, model = exported
    session = DecodeSession(model, provider="cpu")
    pointers = {n: v.data_ptr() for n, v in session.caches.items()}
    inputs = example_inputs(config, [3, 20, 1], seed=seed)
    session.load_cache({n: inputs[n].numpy() for n in CACHE_NAMES})
    gen = torch.Generator().manual_seed(seed)
    for k in range(5):
        want = reference_outputs(model, inputs)
        got = session.run(*(inputs[n].numpy() for n in STEP))
        np.testing.assert_allclose(got, want["out"].numpy(), rtol=1e-3, atol=1e-4, err_msg=f"step {k}")
        resident = session.read_cache()
        for name in CACHE_NAMES:
            if name.endswith("norms"):
                np.testing.assert_allclose(resident[name], want[f"{name}_out"].numpy(), rtol=1e-6, err_msg=name)
            else:  # the new tokens' codes are the reference's but for rounding ties
                assert_codes_match(torch.from_numpy(resident[name]), want[f"{name}_out"],
                                   config.k_bits if name == "k_codes" else config.v_bits, config.head_dim, name)
        # the reference goes on from the session's cache, so that a tie flipped now is not measured
        # later through the reference's own, differently rounded history
        inputs.update({n: torch.from_numpy(resident[n].copy()) for n in CACHE_NAMES})
        inputs = next_step(inputs, config.block_size, gen)
    for name in CACHE_NAMES:
        assert session.caches[name].data_ptr() == pointers[name], f"{name} moved"
    assert session.cache_bytes() == sum(inputs[n].numpy().nbytes for n in CACHE_NAMES)


def test_bad_construction_and_cache_shapes_are_named(exported):
    from tq_deploy.runtime.decode_session import DecodeSession

    config, model = exported
    with pytest.raises(ValueError, match="num_blocks=0, expected >= 1"):
        DecodeSession(model, num_blocks=0)
    session = DecodeSession(model, num_blocks=4)
    with pytest.raises(ValueError, match=r"k_codes.shape=\(3, 16, 2, 32\), expected \(4, 16, 2, 32\)"):
        session.load_cache({"k_codes": np.zeros((3, 16, 2, 32), np.uint8), "k_norms": 0, "v_codes": 0, "v_norms": 0})
    with pytest.raises(ValueError, match=r"missing \[.v_norms.\]"):
        session.load_cache({"k_codes": 0, "k_norms": 0, "v_codes": 0})


def test_step_inputs_of_the_wrong_dtype_and_graphs_off_the_gpu_are_refused(exported):
    from tq_deploy.runtime.decode_session import DecodeSession

    config, model = exported
    with pytest.raises(ValueError, match="cuda_graph=True with provider='cpu', expected provider='cuda'"):
        DecodeSession(model, provider="cpu", cuda_graph=True)
    session = DecodeSession(model, num_blocks=4)
    inputs = example_inputs(config, [3], seed=0)
    feeds = [inputs[n].numpy() for n in STEP]
    feeds[1] = feeds[1].astype(np.int32)
    with pytest.raises(ValueError, match="positions.dtype=int32, expected int64"):
        session.run(*feeds)
