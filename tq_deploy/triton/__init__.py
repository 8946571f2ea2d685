"""Triton kernels for every TurboQuant op (encode, decode, cache update, paged attention).

Same signatures as the reference functions in :mod:`tq_deploy.reference.quantizer`
and :mod:`tq_deploy.reference.paged`; those call into here for CUDA tensors (see
:mod:`tq_deploy.backend`). Supported: bits 1-4, head dim 32/64/128/256, any GQA
group up to 64, any block size (power of two), fp16/bf16/fp32 inputs. On a machine
without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set
before this package is imported) on CPU tensors; that is what the CPU tests do.
"""

from tq_deploy.triton._common import SUPPORTED_BITS, SUPPORTED_DIMS
from tq_deploy.triton.attention import choose_splits, paged_attention
from tq_deploy.triton.quantizer import cache_update, decode, encode


def supports(head_dim: int, *bits: int) -> bool:
    """True when the kernels handle this head dimension and these bit widths."""
    return head_dim in SUPPORTED_DIMS and all(b in SUPPORTED_BITS for b in bits)


__all__ = ["encode", "decode", "cache_update", "paged_attention", "choose_splits", "supports"]
