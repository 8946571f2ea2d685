"""The Triton prefill with value norms beyond fp16's range (65504), under the interpreter on the CPU.

The kernel rounds P * ||v|| to fp16 for the P.V product; it divides by the largest norm of the
tile first and scales the product back, so norms of 1e5-1e6 give a finite output equal to the
reference's. Without that division the product is inf (no other test's norms reach it). A float16-norm
cache holds norms up to 65504 (its largest finite value), which must give the reference's output too.
"""

import pytest
import torch

pytest.importorskip("triton")  # interpreted without CUDA: tests/conftest.py sets TRITON_INTERPRET

from test_paged_prefill import make_prefill  # noqa: E402
from test_triton_prefill import run_case_on  # noqa: E402  (skips this module too where Triton cannot load)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_value_norms_above_the_half_range(dtype, gen):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=2, block_size=16, k_bits=4, v_bits=3,
                                         lens=[30, 9], counts=[12, 9], dtype=dtype)
    scale = 1e5 + 9e5 * torch.rand(inputs["v_norms"].shape, generator=gen)
    inputs["v_norms"] = inputs["v_norms"] * scale
    got, want = run_case_on(inputs, rot, kcb, vcb, 4, 3, block_m=4, block_n=16)
    assert want.abs().max() > 65504 / 8  # the case is reached: outputs of this size need norms past 65504


def test_prefill_float16_norms_up_to_the_largest_finite(gen):
    """A float16-norm cache whose value norms reach 65504, the largest finite float16 (what a cache
    update stores for a float32 norm below 65520): the output is the reference's and stays finite."""
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=2, block_size=16, k_bits=4, v_bits=3,
                                         lens=[30, 9], counts=[12, 9], dtype=torch.float32)
    top = 4e4 + 25504 * torch.rand(inputs["v_norms"].shape, generator=gen)
    top.view(-1)[::7] = 65504.0
    inputs["v_norms"] = torch.where(inputs["v_norms"].isnan(), inputs["v_norms"], top).to(torch.float16)
    inputs["k_norms"] = inputs["k_norms"].to(torch.float16)
    assert (inputs["v_norms"] == 65504).any()
    run_case_on(inputs, rot, kcb, vcb, 4, 3, block_m=4, block_n=16)
