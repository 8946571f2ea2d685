"""Which implementation the public functions run.

On CUDA tensors the reference's public functions (encode, decode,
cache_update, paged_attention) run the Triton kernels of
:mod:`tq_deploy.triton`; everywhere else they run the PyTorch reference. One
switch forces the reference: the environment variable
``TQ_DEPLOY_BACKEND=reference`` or the :func:`force_reference` context manager.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

ENV_VAR = "TQ_DEPLOY_BACKEND"
_BACKENDS = ("auto", "reference")
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


@contextlib.contextmanager
def force_reference():
    """Run the PyTorch reference inside this block, whatever the device."""
    global _forced_depth
    _forced_depth += 1
    try:
        yield
    finally:
        _forced_depth -= 1
