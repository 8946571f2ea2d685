"""The Triton backend: a kernel for every TurboQuant op.

One module per op stem (``encode`` also holds the cache update, an encode into
slots; ``decode``; ``paged_attention``; ``paged_prefill``), each with ``supports_<op>(args)`` and
``<op>(args)`` on the checked arguments of :mod:`tq_deploy.reference.checks`;
:data:`OPS` lists them for the dispatcher (:mod:`tq_deploy.dispatch`), which
checks a call once, asks the backends in order which takes it, and runs that
one. Supported: bits 1-8 (keys and values independently), head dim
32/64/128/256, GQA groups up to 64, power-of-two block sizes, fp16/bf16/fp32
inputs. On a machine without a GPU the
kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before triton
is imported) on CPU tensors; that is what the CPU tests do
(:mod:`tq_deploy.triton.interpret`).
"""

from tq_deploy.triton import decode, encode, paged_attention, paged_prefill
from tq_deploy.triton._common import SUPPORTED_BITS, SUPPORTED_DIMS

NAME = "triton"

# op -> (supports(args) -> bool, run(args))
OPS = {
    "encode": (encode.supports_encode, encode.encode),
    "decode": (decode.supports_decode, decode.decode),
    "cache_update": (encode.supports_cache_update, encode.cache_update),
    "paged_attention": (paged_attention.supports_paged_attention, paged_attention.paged_attention),
    "paged_prefill": (paged_prefill.supports_paged_prefill, paged_prefill.paged_prefill),
}

__all__ = ["NAME", "OPS", "SUPPORTED_BITS", "SUPPORTED_DIMS", "encode", "decode", "paged_attention", "paged_prefill"]
