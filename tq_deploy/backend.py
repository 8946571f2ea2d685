"""Which implementation the public functions run.

On CUDA tensors the reference's public functions (encode, decode,
cache_update, paged_attention) run the Triton kernels of
:mod:`tq_deploy.triton`, except paged_attention, which first tries the
tensor-core CUDA kernel of :mod:`tq_deploy.cuda` (when libtq_deploy_cuda.so is
built and takes the shape); everywhere else they run the PyTorch reference.
``TQ_DEPLOY_BACKEND=reference`` (or the :func:`force_reference` context
manager) forces the reference; ``TQ_DEPLOY_BACKEND=triton`` skips the CUDA
library and keeps the Triton kernels.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

ENV_VAR = "TQ_DEPLOY_BACKEND"
_BACKENDS = ("auto", "triton", "reference")
_forced_depth = 0


def selected() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}, expected one of {_BACKENDS}")
    return "reference" if _forced_depth else value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor, head_dim: int | None = None, bits: tuple[int, ...] = ()) -> bool:
    """True when every tensor is on a CUDA device, Triton imports, the kernels support
    ``head_dim`` and ``bits`` (when given), and nothing forces the reference."""
    if selected() == "reference":
        return False
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    if not triton_available():
        return False
    if head_dim is None:
        return True
    from tq_deploy import triton as tq_triton

    return tq_triton.supports(head_dim, *bits)


def use_cuda_library(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device, libtq_deploy_cuda.so loads and the backend is "auto"."""
    if selected() != "auto":
        return False
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    from tq_deploy import cuda as tq_cuda

    return tq_cuda.available()


@contextlib.contextmanager
def force_reference():
    """Run the PyTorch reference inside this block, whatever the device."""
    global _forced_depth
    _forced_depth += 1
    try:
        yield
    finally:
        _forced_depth -= 1
