"""Code comparison that allows rounding ties, shared by the kernel tests.

A GPU kernel rotates in a different order of float32 operations than the reference, so a
coordinate within float32 rounding of a codebook boundary may take the adjacent code. Allowed:
one step, at most TIE_FRACTION of the codes, and (given x) only where the float64 rotated
coordinate lies within TIE_DISTANCE of the boundary between the two codes.
"""

from __future__ import annotations

import torch

from tq_deploy.reference import codebook_boundaries, unpack_codes

TIE_FRACTION = 1e-3
TIE_DISTANCE = 1e-6


def assert_codes_match(got, want, bits, dim, what="codes", x=None, rot=None, cb=None):
    a = unpack_codes(got.cpu(), bits, dim).long()
    b = unpack_codes(want.cpu(), bits, dim).long()
    diff = a != b
    assert (a - b).abs().max().item() <= 1, f"{what}: a code differs by more than one step"
    frac = diff.float().mean().item()
    assert frac <= TIE_FRACTION, f"{what}: {frac:.2e} of codes differ (ties allowed up to {TIE_FRACTION})"
    if x is not None and diff.any():
        x64 = x.cpu().double().reshape(-1, dim)
        y = (x64 / x64.norm(dim=-1, keepdim=True).clamp_min(1e-300)) @ rot.cpu().double().T
        bounds = codebook_boundaries(cb.cpu().double())
        lower = torch.minimum(a, b).reshape(-1, dim)[diff.reshape(-1, dim)]
        dist = (y[diff.reshape(-1, dim)] - bounds[lower]).abs()
        assert dist.max().item() < TIE_DISTANCE, f"{what}: a differing code is {dist.max():.2e} from its boundary"
