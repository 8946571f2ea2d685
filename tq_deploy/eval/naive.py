"""The naive baseline: per-token absmax uniform quantization, no rotation.

For one vector x in R^D (one token of one KV head) with a = max_j |x_j|, the
2**b levels are spread evenly over [-a, a], both ends included:

    step  = 2a / (2**b - 1)
    code  = round((x_j + a) / step)          in [0, 2**b - 1]
    x_hat = code * step - a

so every code is used and the largest coordinate is reproduced exactly (the
common "round(x / a * (2**(b-1) - 1))" form leaves one code unused, which
would make the baseline weaker than it needs to be). Storage: b bits per
coordinate plus the scale a per vector, counted as fp16 like TurboQuant's norm
(configs.py), so at equal bits both methods store the same number of bytes.
Without the rotation one large channel sets the step for all the others:
exactly the weakness TurboQuant's random rotation removes.
"""

from __future__ import annotations

import torch

from tq_deploy.reference.checks import FLOAT_DTYPES, check_bits, check_tensor


class NaiveAbsmaxQuantizer:
    """Per-vector absmax uniform quantizer with ``bits`` bits per coordinate."""

    def __init__(self, bits: int):
        self.bits = check_bits("bits", bits)
        self.levels = 2**bits - 1  # number of steps between -a and a

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x[..., D] -> (codes uint8 [..., D], float32 absmax scales [...])."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
        xf = x.float()
        absmax = xf.abs().amax(dim=-1)
        step = (2 * absmax / self.levels).unsqueeze(-1)
        safe_step = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round((xf + absmax.unsqueeze(-1)) / safe_step).clamp_(0, self.levels)
        return codes.to(torch.uint8), absmax

    def decode(self, codes: torch.Tensor, absmax: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        step = (2 * absmax / self.levels).unsqueeze(-1)
        return (codes.float() * step - absmax.unsqueeze(-1)).to(dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Encode then decode; x_hat in x's dtype (a zero vector stays zero)."""
        codes, absmax = self.encode(x)
        return self.decode(codes, absmax, x.dtype)
