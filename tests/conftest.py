"""Shared pytest setup: skip ``gpu`` tests cleanly without a CUDA device, and hand out fresh seeds.

Tests draw fresh random inputs on every run. The seed of each run is printed
in the failure report (``fresh seed=...``) and can be pinned with the
environment variable ``TQ_TEST_SEED`` to replay a failure.
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch

# Triton chooses compiled or interpreted kernels at its first import, from TRITON_INTERPRET
# (tq_deploy.triton.interpret): set it before any test module can import triton, so that the
# Triton tests run under the interpreter on a machine without CUDA whatever the test order.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test (or TQ_TEST_SEED), reported with the test's outcome."""
    value = int(os.environ.get("TQ_TEST_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", value))
    print(f"fresh seed={value}")
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU torch.Generator seeded from the test's fresh seed."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: many tiny LAPACK calls (QR of a 64x64 matrix)
    are hundreds of times slower with an oversubscribed OpenMP pool on a busy machine."""
    from tq_deploy.reference.llama import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def ort_library() -> str:
    """Path of the ONNX Runtime custom-op library; skips (with the reason) without onnxruntime or
    where the library is not built."""
    pytest.importorskip("onnxruntime")
    from tq_deploy.runtime import library

    try:
        return library.ort_library_path()
    except library.NativeLibraryNotFoundError as err:
        pytest.skip(f"custom-op library not built: {err}")


@pytest.fixture(scope="module")
def trt_libraries():
    """The TensorRT plugin library and its enqueue harness; skips (with the reason) where they are not built."""
    from tq_deploy.runtime import library

    try:
        return library.locate("trt"), library.locate("trt_harness")
    except library.NativeLibraryNotFoundError as err:
        pytest.skip(f"TensorRT plugin library not built: {err}")
