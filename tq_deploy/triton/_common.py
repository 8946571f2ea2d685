"""Host-side pieces shared by the Triton ops: supported shapes and the rotation split.

Nothing here launches a kernel. The rotation is split into parts in the input's
half precision so that tensor cores reproduce an fp32 product (see
:func:`rotation_parts`); the parts are cached per rotation tensor.
"""

from __future__ import annotations

import torch

from tq_deploy.device_constants import cached

SUPPORTED_DIMS = (32, 64, 128, 256)
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Scale between consecutive rotation parts: a part holds the residual of the
# previous ones times this power of two, so every part is a normal number.
PART_SCALE = {torch.float16: 2048.0, torch.bfloat16: 256.0}
PART_COUNT = {torch.float16: 2, torch.bfloat16: 3}


def runs_here(device: torch.device) -> bool:
    """Triton compiles for CUDA devices; under the interpreter (CPU tests) it runs on CPU tensors."""
    from tq_deploy.triton._dot import interpreting

    return device.type == "cuda" or interpreting()


def rotation_parts(rotation: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Pi^T split as sum_k part_k * PART_SCALE**-k with every part in ``dtype``.

    x is exact in its own half type, products of two halves are exact in fp32
    and the tensor cores accumulate in fp32, so x @ sum(parts) reproduces the
    fp32 product x @ Pi^T to about 2**-22 relative (fp16: 2 parts of 11 bits;
    bf16: 3 parts of 8 bits). For fp32 inputs the single fp32 Pi^T is returned.
    """

    def make():
        rot_t = rotation.detach().to(device=device, dtype=torch.float32).t().contiguous()
        if dtype == torch.float32:
            return (rot_t,)
        scale = PART_SCALE[dtype]
        parts = []
        residual = rot_t
        for _ in range(PART_COUNT[dtype]):
            part = residual.to(dtype)
            parts.append(part.contiguous())
            residual = (residual - part.float()) * scale
        return tuple(parts)

    return cached("rot_parts", rotation, make, dtype, str(device))


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """int32 view of packed uint8 codes (last dimension a multiple of 4 bytes)."""
    return codes.view(torch.int32)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
