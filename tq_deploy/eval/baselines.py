"""Baselines users pick instead of TurboQuant: KIVI-style per-channel keys and int8.

KIVI-style (after Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache", 2024): uniform asymmetric quantization with 2**b levels between a
group's minimum m and maximum M,

    scale = (M - m) / (2**b - 1),   code = round((x - m) / scale),   x_hat = code * scale + m

* keys **per channel**: one (m, M) per channel over each group of ``group_size``
  consecutive tokens (outlier channels get their own range instead of setting the
  step of every other channel);
* values **per token**: one (m, M) per vector.

Tokens are grouped from the start of every cache update (a chunk of the
evaluation, the prompt of a serving engine); a chunk whose length is not a
multiple of ``group_size`` ends with a smaller group. KIVI itself keeps the most
recent tokens (fewer than a group) unquantized; here every token is quantized, as
for every other configuration, so the storage accounting stays the same.

int8: per-token symmetric absmax, ``code = round(127 x / a)``, ``x_hat = code a / 127``
with a = max_j |x_j| (the usual int8 KV cache of serving engines).
"""

from __future__ import annotations

import torch

from tq_deploy.reference.checks import FLOAT_DTYPES, check_bits, check_tensor


def _uniform(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Round x to the nearest of 2**bits evenly spaced levels on [low, high] (broadcast), float32."""
    levels = 2**bits - 1
    step = (high - low) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((x - low) / safe).clamp_(0, levels)
    return torch.where(step > 0, codes * step + low, low)


class PerTokenAsymmetricQuantizer:
    """KIVI values: one (min, max) per vector of the last dimension."""

    def __init__(self, bits: int):
        self.bits = check_bits("bits", bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
        xf = x.float()
        low, high = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        return _uniform(xf, low, high, self.bits).to(x.dtype)


class PerChannelKeyQuantizer:
    """KIVI keys: one (min, max) per channel over each group of ``group_size`` tokens.

    ``x`` is [..., tokens, head_dim]; groups run along the token axis from its first token.
    """

    def __init__(self, bits: int, group_size: int = 32):
        self.bits = check_bits("bits", bits)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r}, expected an int >= 1")
        self.group_size = group_size

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=2)
        xf = x.float()
        out = torch.empty_like(xf)
        tokens = x.shape[-2]
        for start in range(0, tokens, self.group_size):
            group = xf[..., start:start + self.group_size, :]
            low, high = group.amin(-2, keepdim=True), group.amax(-2, keepdim=True)
            out[..., start:start + self.group_size, :] = _uniform(group, low, high, self.bits)
        return out.to(x.dtype)


class Int8AbsmaxQuantizer:
    """Per-vector symmetric int8: 255 levels k * a / 127, k in [-127, 127], a = max |x_j|."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, min_rank=1)
        xf = x.float()
        absmax = xf.abs().amax(-1, keepdim=True)
        step = absmax / 127
        safe = torch.where(step > 0, step, torch.ones_like(step))
        return (torch.round(xf / safe).clamp_(-127, 127) * step).to(x.dtype)
