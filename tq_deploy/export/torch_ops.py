"""The TurboQuant steps as torch custom ops, and their ONNX translations.

``torch.export`` cannot see through the reference's data-dependent paged
gathers, and the ONNX graph must carry each step as one "turboquant"-domain
node anyway. So during export the decode model calls these opaque custom ops
(namespace ``tq_export``):

    torch.ops.tq_export.cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                     rotation, k_codebook, v_codebook, k_bits, v_bits) -> 4 caches
    torch.ops.tq_export.paged_attention(query, k_codes, k_norms, v_codes, v_norms, block_tables,
                                        context_lens, rotation, k_codebook, v_codebook,
                                        k_bits, v_bits, scale) -> out
    torch.ops.tq_export.paged_prefill(query, k_codes, k_norms, v_codes, v_norms, block_tables,
                                      context_lens, query_start, rotation, k_codebook, v_codebook,
                                      k_bits, v_bits, scale) -> out

Their eager bodies are the PyTorch reference (functional: the cache update
returns updated copies, as the ONNX op's outputs are); their fake bodies give
the output shapes; :data:`TRANSLATION_TABLE` maps each to an onnxscript
function that emits the custom node, for ``torch.onnx.export(dynamo=True,
custom_translation_table=...)``.
"""

from __future__ import annotations

import torch

from tq_deploy import ops
from tq_deploy.export.schemas import register_schemas
from tq_deploy.reference.paged import cache_update_reference, paged_attention_reference, paged_prefill_reference

Tensor = torch.Tensor


@torch.library.custom_op("tq_export::cache_update", mutates_args=())
def cache_update(key: Tensor, value: Tensor, slot_mapping: Tensor, k_codes: Tensor, k_norms: Tensor,
                 v_codes: Tensor, v_norms: Tensor, rotation: Tensor, k_codebook: Tensor, v_codebook: Tensor,
                 k_bits: int, v_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    caches = [t.clone() for t in (k_codes, k_norms, v_codes, v_norms)]
    cache_update_reference(key, value, slot_mapping, *caches, rotation, k_codebook, v_codebook, k_bits, v_bits)
    return tuple(caches)


@cache_update.register_fake
def _cache_update_fake(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation, k_codebook,
                       v_codebook, k_bits, v_bits):
    return tuple(torch.empty_like(t) for t in (k_codes, k_norms, v_codes, v_norms))


@torch.library.custom_op("tq_export::paged_attention", mutates_args=())
def paged_attention(query: Tensor, k_codes: Tensor, k_norms: Tensor, v_codes: Tensor, v_norms: Tensor,
                    block_tables: Tensor, context_lens: Tensor, rotation: Tensor, k_codebook: Tensor,
                    v_codebook: Tensor, k_bits: int, v_bits: int, scale: float, key_mean: Tensor | None = None,
                    rope_inv_freq: Tensor | None = None) -> Tensor:
    return paged_attention_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                     rotation, k_codebook, v_codebook, k_bits, v_bits, scale, key_mean, rope_inv_freq)


@paged_attention.register_fake
def _paged_attention_fake(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                          k_codebook, v_codebook, k_bits, v_bits, scale, key_mean=None, rope_inv_freq=None):
    return torch.empty_like(query)


@torch.library.custom_op("tq_export::paged_prefill", mutates_args=())
def paged_prefill(query: Tensor, k_codes: Tensor, k_norms: Tensor, v_codes: Tensor, v_norms: Tensor,
                  block_tables: Tensor, context_lens: Tensor, query_start: Tensor, rotation: Tensor,
                  k_codebook: Tensor, v_codebook: Tensor, k_bits: int, v_bits: int, scale: float,
                  key_mean: Tensor | None = None, rope_inv_freq: Tensor | None = None) -> Tensor:
    return paged_prefill_reference(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                   query_start, rotation, k_codebook, v_codebook, k_bits, v_bits, scale, key_mean,
                                   rope_inv_freq)


@paged_prefill.register_fake
def _paged_prefill_fake(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start,
                        rotation, k_codebook, v_codebook, k_bits, v_bits, scale, key_mean=None, rope_inv_freq=None):
    return torch.empty_like(query)


def translation_table() -> dict:
    """torch op -> onnxscript function emitting the "turboquant" node (needs onnxscript)."""
    try:
        import onnxscript
    except ImportError as err:
        raise ImportError(f"exporting the decode model needs onnxscript ({err}); install it with "
                          "`pip install onnxscript` (torch.onnx's dynamo exporter is built on it)") from None

    # onnxscript looks up the op's schema (number of outputs, attribute types) in onnx.defs.
    register_schemas()
    turboquant = onnxscript.values.Opset(ops.DOMAIN, ops.DOMAIN_VERSION)

    def cache_update_onnx(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation,
                          k_codebook, v_codebook, k_bits: int, v_bits: int):
        return turboquant.TQCacheUpdate(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                        rotation, k_codebook, v_codebook, k_bits=k_bits, v_bits=v_bits)

    # The key mean's two inputs trail the node only when given (ONNX optional inputs).
    def paged_attention_onnx(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, rotation,
                             k_codebook, v_codebook, k_bits: int, v_bits: int, scale: float, key_mean=None,
                             rope_inv_freq=None):
        mean = () if key_mean is None else (key_mean, rope_inv_freq)
        return turboquant.TQPagedAttention(query, k_codes, k_norms, v_codes, v_norms, block_tables,
                                           context_lens, rotation, k_codebook, v_codebook, *mean,
                                           k_bits=k_bits, v_bits=v_bits, scale=scale)

    def paged_prefill_onnx(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens, query_start,
                           rotation, k_codebook, v_codebook, k_bits: int, v_bits: int, scale: float, key_mean=None,
                           rope_inv_freq=None):
        mean = () if key_mean is None else (key_mean, rope_inv_freq)
        return turboquant.TQPagedPrefill(query, k_codes, k_norms, v_codes, v_norms, block_tables, context_lens,
                                         query_start, rotation, k_codebook, v_codebook, *mean,
                                         k_bits=k_bits, v_bits=v_bits, scale=scale)

    return {
        torch.ops.tq_export.cache_update.default: cache_update_onnx,
        torch.ops.tq_export.paged_attention.default: paged_attention_onnx,
        torch.ops.tq_export.paged_prefill.default: paged_prefill_onnx,
    }
