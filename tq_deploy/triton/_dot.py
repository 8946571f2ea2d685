"""tl.dot wrapper that works around the Triton interpreter's bf16 matmul.

The interpreter stores bf16 as uint16 and multiplies those integers in tl.dot
(seen with triton 3.9), so under TRITON_INTERPRET=1 bf16 operands are upcast to
fp32 first (exact: bf16 products fit fp32). Compiled kernels never take that path.
"""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels decorated now run under the Triton interpreter."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def half_dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b for half operands (fp32 accumulate)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
