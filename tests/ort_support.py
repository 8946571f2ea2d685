"""What the ONNX Runtime op tests share: the bound of an attention output against the reference, and
a run of a test file's selection on the portable CPU kernels."""

from __future__ import annotations

import os
import subprocess
import sys

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


def assert_passes_on_portable_kernels(test_file: str, library: str, selection: str, passed: int) -> None:
    """``pytest test_file -k selection`` in a fresh process with TQ_DEPLOY_CPU_KERNELS=portable (the
    kernels are chosen once per process): ``passed`` tests pass."""
    env = dict(os.environ, TQ_DEPLOY_CPU_KERNELS="portable", TQ_DEPLOY_ORT_LIBRARY=library)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{passed} passed" in result.stdout, result.stdout[-2000:]
