"""The PyTorch reference of TurboQuant: the numerical source of truth for every backend.

Read in the order of the paper: codebook (Lloyd-Max for the rotated
coordinates), rotation (Haar or randomized Hadamard), packing, quantizer
(TurboQuant_mse, TurboQuant_prod, mixed precision), paged (KV cache and fused
decode attention in the rotated domain), model (an exportable decode step).
``checks`` holds the argument checks every op runs once per call.

This package imports nothing of tq_deploy above it (no dispatcher, no kernels):
it is the oracle. The fast paths on GPU tensors are :mod:`tq_deploy.dispatch`.
"""

from tq_deploy.reference.codebook import codebook_boundaries, expected_mse, lloyd_max_codebook, paper_bounds
from tq_deploy.reference.model import TQDecodeModel, TQDecodeStack, TQModelConfig, decode_model, example_inputs
from tq_deploy.reference.packing import pack_codes, unpack_codes
from tq_deploy.reference.paged import (
    PagedTQCache,
    allocate_cache,
    cache_update_reference,
    dense_attention_reference,
    paged_attention_reference,
    paged_prefill_reference,
)
from tq_deploy.reference.quantizer import (
    MixedPrecisionTurboQuant,
    TurboQuantMSE,
    TurboQuantProd,
    decode_reference,
    encode_reference,
)
from tq_deploy.reference.rotation import fwht, hadamard_rotation, haar_rotation, make_rotation

__all__ = [name for name in dir() if not name.startswith("_")]
