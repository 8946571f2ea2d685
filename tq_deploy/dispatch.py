"""The public TurboQuant ops on torch tensors, each run by the fastest backend that takes the call.

    from tq_deploy.dispatch import encode, decode, cache_update, paged_attention, paged_prefill

Same signatures as the reference (:mod:`tq_deploy.reference`). Every call is checked once
(:mod:`tq_deploy.reference.checks`); then the backends are asked in order whether they take it:

    cuda       libtq_deploy_cuda.so (:mod:`tq_deploy.cuda`): the tensor-core decode attention (no prefill yet)
    triton     the Triton kernels (:mod:`tq_deploy.triton`)
    reference  the PyTorch reference, which takes everything (and is the only one on CPU tensors)

``TQ_DEPLOY_BACKEND`` (read once, at the first call) or :func:`use_backend` picks the order:

    auto       cuda, triton, reference (default); a CUDA library that fails to load is said once
    cuda       cuda, reference: an error when the CUDA library is missing; Triton is never imported
    triton     triton, reference: an error when Triton is missing
    reference  reference only

A serving loop that calls the attention with the same cache every step plans it once
(:func:`plan_paged_attention`, FlashInfer-style): the checks and the backend choice happen
there, and each step's ``run`` only launches.

Values the host cannot see without a synchronization (context lengths, block-table entries,
slots) are checked only when the reference runs; the GPU kernels never read out of bounds on
them instead (docs/ops.md, "Bad input").
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

from tq_deploy.reference import checks
from tq_deploy.reference.paged import cache_update_checked, paged_attention_checked, paged_prefill_checked
from tq_deploy.reference.quantizer import decode_checked, encode_checked

ENV_VAR = "TQ_DEPLOY_BACKEND"
CHOICES = ("auto", "cuda", "triton", "reference")
_ORDERS = {"auto": ("cuda", "triton"), "cuda": ("cuda",), "triton": ("triton",), "reference": ()}

_REFERENCE = {
    "encode": (encode_checked, checks.check_codec_data),
    "decode": (decode_checked, checks.check_codec_data),
    "cache_update": (cache_update_checked, checks.check_cache_update_data),
    "paged_attention": (paged_attention_checked, checks.check_paged_attention_data),
    "paged_prefill": (paged_prefill_checked, checks.check_paged_prefill_data),
}

_selected: str | None = None  # None: read ENV_VAR at the next call
_gpu_backends: tuple | None = None  # (name, OPS table) of the GPU backends that loaded, in order


def _parse(value: str) -> str:
    choice = value.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}, expected one of {CHOICES}")
    return choice


def selected() -> str:
    """The backend choice in force: :func:`use_backend`'s, else ``TQ_DEPLOY_BACKEND``'s (read once)."""
    global _selected
    if _selected is None:
        _selected = _parse(os.environ.get(ENV_VAR, "auto"))
    return _selected


def _load_backend(name: str):
    """The OPS table of a GPU backend, or the reason it cannot load."""
    if name == "cuda":
        from tq_deploy import cuda

        reason = cuda.unavailable_reason()
        return (None, reason) if reason else (cuda.OPS, "")
    try:
        module = importlib.import_module("tq_deploy.triton")
    except ImportError as err:
        return None, f"Triton does not import: {err}"
    return module.OPS, ""


def _backends() -> tuple:
    global _gpu_backends
    if _gpu_backends is None:
        choice = selected()
        loaded = []
        for name in _ORDERS[choice]:
            ops, reason = _load_backend(name)
            if ops is not None:
                loaded.append((name, ops))
            elif choice != "auto":
                raise RuntimeError(f"{ENV_VAR}={choice}: the {name} backend cannot run: {reason}")
            elif name == "cuda" and torch.cuda.is_available():
                warnings.warn(f"tq_deploy: the CUDA kernel library is not used ({reason}); GPU calls run the "
                              "Triton kernels or the reference", RuntimeWarning, stacklevel=3)
        _gpu_backends = tuple(loaded)
    return _gpu_backends


@contextlib.contextmanager
def use_backend(choice: str):
    """Run with backend order ``choice`` (one of CHOICES) inside this block; nests and restores."""
    global _selected, _gpu_backends
    previous = (_selected, _gpu_backends)
    _selected, _gpu_backends = _parse(choice), None
    try:
        yield
    finally:
        _selected, _gpu_backends = previous


def force_reference():
    """Run the PyTorch reference inside this block, whatever the device."""
    return use_backend("reference")


def backend_for(op: str, args) -> str:
    """The name of the backend that runs ``op`` on checked ``args``."""
    return _choose(op, args)[0]


def _choose(op: str, args):
    if args.device.type == "cuda":
        for name, table in _backends():
            entry = table.get(op)
            if entry is not None and entry[0](args):
                return name, entry[1]
    run, check_data = _REFERENCE[op]
    return "reference", lambda a: (check_data(a), run(a))[1]


def encode(x, rotation, codebook, bits):
    """TurboQuant_mse encode: (codes uint8 [..., ceil(D*bits/8)], norms float32 [...])."""
    args = checks.check_encode(x, rotation, codebook, bits, check_data=False)
    return _choose("encode", args)[1](args)


def decode(codes, norms, rotation, codebook, bits, dtype=torch.float32):
    """TurboQuant_mse decode: x_hat [..., D] = norm * Pi^T c[code] in ``dtype``."""
    args = checks.check_decode(codes, norms, rotation, codebook, bits, dtype, check_data=False)
    return _choose("decode", args)[1](args)


def cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation, k_codebook, v_codebook,
                 k_bits, v_bits):
    """Encode key/value [T, Hkv, D] into the paged cache in place; returns the four cache tensors."""
    args = checks.check_cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation,
                                     k_codebook, v_codebook, k_bits, v_bits, check_data=False)
    return _choose("cache_update", args)[1](args)


def paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation, k_codebook,
                    v_codebook, k_bits, v_bits, scale=0.0, key_mean=None, rope_inv_freq=None):
    """Paged TurboQuant decode attention: out [S, Hq, D] in the query's dtype."""
    args = checks.check_paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                        rotation, k_codebook, v_codebook, k_bits, v_bits, scale, key_mean,
                                        rope_inv_freq, check_data=False)
    return _choose("paged_attention", args)[1](args)


def paged_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start, rotation,
                  k_codebook, v_codebook, k_bits, v_bits, scale=0.0, key_mean=None, rope_inv_freq=None):
    """Paged TurboQuant prefill attention (causal, packed rows): out [T, Hq, D] in the query's dtype."""
    args = checks.check_paged_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                      query_start, rotation, k_codebook, v_codebook, k_bits, v_bits, scale,
                                      key_mean, rope_inv_freq, check_data=False)
    return _choose("paged_prefill", args)[1](args)


def plan_paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation, k_codebook,
                         v_codebook, k_bits, v_bits, scale=0.0, key_mean=None, rope_inv_freq=None, *,
                         tokens_per_split: int = 0):
    """Check a paged attention call once and return a plan whose ``run(query, block_tables,
    context_lens, out=None)`` computes it for any step over the same cache (the example arguments
    fix everything but the batch and the table width). On the CUDA backend the run path is one
    launch (:class:`tq_deploy.cuda.PagedAttentionPlan`, a few microseconds of host time); elsewhere
    it is :func:`paged_attention` on the fixed arguments.
    """
    args = checks.check_paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                        rotation, k_codebook, v_codebook, k_bits, v_bits, scale, key_mean,
                                        rope_inv_freq, check_data=False)
    name, _ = _choose("paged_attention", args)
    if name == "cuda":
        from tq_deploy import cuda

        return cuda.PagedAttentionPlan(args, tokens_per_split)
    return _CheckedEveryStep(k_codes, k_norms, v_codes, v_norms, rotation, k_codebook, v_codebook, k_bits, v_bits,
                             scale, key_mean, rope_inv_freq)


class _CheckedEveryStep:
    """The plan of a backend without a launch-only path: every run is a full public call."""

    def __init__(self, *fixed):
        self._caches, self._rest = fixed[:4], fixed[4:]

    def run(self, query, block_tables, context_lens, out=None):
        result = paged_attention(query, *self._caches, block_tables, context_lens, *self._rest)
        if out is None:
            return result
        out.copy_(result)
        return out
