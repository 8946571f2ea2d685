"""Agreement: whether a runner's outputs for a valid case match the reference's.

Codes identical except adjacent codes at rounding ties, norms to 2e-6, attention and decode rows
to 1e-4 relative of the row's max (fp16-level on the GPU), the same rows NaN or infinite. Which
rule an output follows comes from its name in the contract (:mod:`tq_deploy.ops`): ``codes``
and ``norms`` of an encode, ``*_out`` caches of a cache write, any other float output row by row.
"""

from __future__ import annotations

import numpy as np

from tq_deploy.validate.fuzz.case import Case

CACHE = ("k_codes", "k_norms", "v_codes", "v_norms")
# Tolerances of the agreement checks (the reference is the source of truth).
NORM_RTOL = 2e-6
HALF_NORM_RTOL = 2.0 ** -10  # a float16 cache norm: float32 norms 2e-6 apart may round to neighbouring halves
ROW_RTOL = {np.float32: 1e-4, np.float16: 2e-3}
GPU_ROW_RTOL = 3e-2  # fp16/bf16 tensor-core products in the GPU kernels
TIE_TOL = 2e-5  # |y - boundary| under which a code may go either way
GPU_TIE_TOL = 2e-3  # the GPU encode rotates in split fp16 products


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def close_rows(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> str:
    """'' when every row agrees: the same rows non-finite, finite rows within rtol of the row's max."""
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    g, w = _rows(got.astype(np.float64)), _rows(want.astype(np.float64))
    if not g.size:
        return ""
    bad_g, bad_w = ~np.isfinite(g).all(axis=1), ~np.isfinite(w).all(axis=1)
    if (bad_g != bad_w).any():
        r = int(np.argmax(bad_g != bad_w))
        return f"{what}: row {r} non-finite={bool(bad_g[r])}, expected {bool(bad_w[r])} (the reference's)"
    ok = ~bad_w
    if not ok.any():
        return ""
    scale = np.abs(w[ok]).max(axis=1, keepdims=True)
    err = np.abs(g[ok] - w[ok]) - rtol * (np.abs(w[ok]) + scale) - 1e-30
    if (err > 0).any():
        r, c = np.unravel_index(int(np.argmax(err)), err.shape)
        return (f"{what}: {g[ok][r, c]!r} at row {int(np.flatnonzero(ok)[r])} column {c}, expected "
                f"{w[ok][r, c]!r} (rtol {rtol} of the row's max {float(scale[r, 0]):.3g})")
    return ""


def _unit_rotated(x: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    norm = np.linalg.norm(x64, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(norm > 0, x64 / norm, 0.0)
    return u @ rotation.astype(np.float64).T


def codes_agree(got: np.ndarray, want: np.ndarray, x: np.ndarray, rotation: np.ndarray, codebook: np.ndarray,
                bits: int, what: str, tie_tol: float = TIE_TOL) -> str:
    """Identical codes except at rounding ties (y within TIE_TOL of a boundary, adjacent codes);
    vectors with a non-finite coordinate or norm have unspecified codes and are skipped."""
    from tq_deploy.reference.packing import unpack_codes
    import torch

    dim = x.shape[-1]
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    if not got.size:
        return ""
    g = unpack_codes(torch.from_numpy(np.ascontiguousarray(got)), bits, dim).numpy().reshape(-1, dim).astype(int)
    w = unpack_codes(torch.from_numpy(np.ascontiguousarray(want)), bits, dim).numpy().reshape(-1, dim).astype(int)
    x2 = x.reshape(-1, dim).astype(np.float64)
    finite = np.isfinite(x2).all(axis=1) & np.isfinite(np.linalg.norm(x2, axis=1))
    diff = (g != w) & finite[:, None]
    if not diff.any():
        return ""
    y = _unit_rotated(x2, rotation)
    bounds = (codebook[1:].astype(np.float64) + codebook[:-1]) / 2
    for r, c in zip(*np.nonzero(diff)):
        lo = min(g[r, c], w[r, c])
        if abs(g[r, c] - w[r, c]) != 1 or abs(y[r, c] - bounds[lo]) > tie_tol * (1 + abs(y[r, c])):
            return (f"{what}: code {g[r, c]} at vector {r} coordinate {c}, expected {w[r, c]} "
                    f"(y={y[r, c]:.7g}, nearest boundary {bounds[lo]:.7g})")
    return ""


def agree(case: Case, got: dict[str, np.ndarray], want: dict[str, np.ndarray], gpu: bool = False) -> str:
    """'' when backend outputs ``got`` agree with the reference's ``want`` for valid ``case``."""
    inp = case.inputs
    float_t = np.float16 if any(inp[t.name].dtype == np.float16 for t in case.spec.inputs
                                if t.type_param == "T" and t.name in inp) else np.float32
    rtol = GPU_ROW_RTOL if gpu else ROW_RTOL[float_t]
    norm_rtol = 1e-5 if gpu else NORM_RTOL
    if "k_norms" in inp and inp["k_norms"].dtype == np.float16:
        norm_rtol = HALF_NORM_RTOL
    tie_tol = GPU_TIE_TOL if gpu else TIE_TOL
    outputs = case.spec.output_names()
    if "codes" in outputs:  # an encode
        problem = close_rows(got["norms"].reshape(-1, 1), want["norms"].reshape(-1, 1), norm_rtol, "norms")
        return problem or codes_agree(got["codes"], want["codes"], inp["x"], inp["rotation"], inp["codebook"],
                                      case.attrs["bits"][0], "codes", tie_tol)
    if "k_codes_out" in outputs:
        return _cache_agrees(case, got, want, norm_rtol, tie_tol)
    for name in outputs:
        problem = close_rows(got[name], want[name], rtol, name)
        if problem:
            return problem
    return ""


def _cache_agrees(case: Case, got, want, norm_rtol: float, tie_tol: float) -> str:
    """A cache write: written slots agree as an encode, every other slot byte for byte."""
    inp = case.inputs
    for name in CACHE:
        out = got[f"{name}_out"]
        if out.shape != want[f"{name}_out"].shape:
            return f"{name}_out: shape {out.shape}, expected {want[f'{name}_out'].shape}"
    slots = inp["slot_mapping"]
    hkv, dim = inp["key"].shape[1], inp["key"].shape[2]
    n, b = inp["k_codes"].shape[:2]
    last = {int(s): t for t, s in enumerate(slots) if s >= 0}
    written = np.zeros(n * b, bool)
    written[list(last)] = True
    for name in CACHE:
        g = got[f"{name}_out"].reshape(n * b, hkv, -1)
        w = want[f"{name}_out"].reshape(n * b, hkv, -1)
        if not np.array_equal(g[~written], w[~written], equal_nan=name.endswith("norms")):
            return f"{name}_out: a slot no token names changed"
    order = sorted(last)
    tokens = [last[s] for s in order]
    for side, bits_attr in (("k", "k_bits"), ("v", "v_bits")):
        src = inp["key" if side == "k" else "value"][tokens].astype(np.float32)
        g_n = got[f"{side}_norms_out"].reshape(n * b, hkv)[order]
        w_n = want[f"{side}_norms_out"].reshape(n * b, hkv)[order]
        problem = close_rows(g_n.reshape(-1, 1), w_n.reshape(-1, 1), norm_rtol, f"{side}_norms_out")
        if problem:
            return problem
        g_c = got[f"{side}_codes_out"].reshape(n * b, hkv, -1)[order]
        w_c = want[f"{side}_codes_out"].reshape(n * b, hkv, -1)[order]
        problem = codes_agree(g_c, w_c, src.reshape(-1, dim), inp["rotation"], inp[f"{side}_codebook"],
                              case.attrs[bits_attr][0], f"{side}_codes_out", tie_tol)
        if problem:
            return problem
    return ""
