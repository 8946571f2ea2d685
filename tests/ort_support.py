"""What the ONNX Runtime op tests share: the bound of an attention output against the reference."""

from __future__ import annotations

import numpy as np
import torch


def assert_attention_close(out: np.ndarray, ref: torch.Tensor, dtype: str) -> None:
    """float32: |out - ref| <= 1e-4 |ref| + 1e-5 max|ref| elementwise; float16: rtol 2e-3, atol 2e-3
    max|ref|. Every output finite: a slot or table entry the call must not read never reaches it."""
    ref_np = ref.float().numpy()
    scale = max(np.abs(ref_np).max(), 1e-30)
    assert np.isfinite(out).all(), "a slot or table entry the call must not read reached the output"
    if dtype == "float16":
        assert out.dtype == np.float16
        np.testing.assert_allclose(out.astype(np.float32), ref_np, rtol=2e-3, atol=2e-3 * scale)
    else:
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref_np, rtol=1e-4, atol=1e-5 * scale)
