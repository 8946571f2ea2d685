"""What the Triton attention and prefill tests of the key mean share: the drawn inputs and the error."""

from __future__ import annotations

import torch


def draw_key_mean(hkv, dim, gen, magnitude=1.0, rate_scale=1.0):
    """key_mean [Hkv, D] = magnitude * N(0, 1) and RoPE rates w_j = rate_scale * 10000^(-2j/D)."""
    mean = torch.randn(hkv, dim, generator=gen) * magnitude
    rates = rate_scale * 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return mean, rates.float()


def relative_error(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
