"""A transformers KV cache that stores quantize(encode -> decode) of every key and value.

What is quantized, exactly: ``Cache.update(key_states, value_states, layer_idx)``
is called by every attention layer with the K/V of the tokens of the current
forward call (keys after RoPE, which is what a serving engine caches). This
cache replaces them by their reconstructions x_hat *before* appending them, and
returns the whole cache (past + new, all reconstructions) to the attention.
So every query attends to the quantized keys/values of all earlier tokens and
also of its own chunk, itself included -- the order of a fused
"CacheUpdate, then PagedAttention over the cache" decode step (ops.py). Queries,
hidden states, weights and the softmax stay in the model's precision (fp32).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tq_deploy.eval.kv_quantizers import KVQuantizer


class QuantizedKVCache(DynamicCache):
    """DynamicCache whose ``update`` quantizes the new keys and values of every layer.

    Also accumulates, per kind, sum ||x - x_hat||^2 and sum ||x||^2 so that the
    relative reconstruction error of the keys and values can be reported.
    """

    def __init__(self, quantizer: KVQuantizer, **kwargs):
        super().__init__(**kwargs)
        self.quantizer = quantizer
        self.quantized_tokens: dict[int, int] = {}
        self.squared_error = {"keys": 0.0, "values": 0.0}
        self.squared_norm = {"keys": 0.0, "values": 0.0}

    def _record(self, kind: str, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.squared_error[kind] += float((x.float() - x_hat.float()).pow(2).sum())
        self.squared_norm[kind] += float(x.float().pow(2).sum())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        key_hat = self.quantizer.quantize_keys(key_states, layer_idx)
        value_hat = self.quantizer.quantize_values(value_states, layer_idx)
        if key_hat.shape != key_states.shape or value_hat.shape != value_states.shape:
            raise ValueError(
                f"quantizer {self.quantizer.name!r} returned shapes {tuple(key_hat.shape)}/{tuple(value_hat.shape)}, "
                f"expected {tuple(key_states.shape)}/{tuple(value_states.shape)}"
            )
        self._record("keys", key_states, key_hat)
        self._record("values", value_states, value_hat)
        self.quantized_tokens[layer_idx] = self.quantized_tokens.get(layer_idx, 0) + key_states.shape[-2]
        return super().update(key_hat.to(key_states.dtype), value_hat.to(value_states.dtype), layer_idx, *args, **kwargs)

    def relative_mse(self, kind: str) -> float:
        """sum ||x - x_hat||^2 / sum ||x||^2 over everything cached so far (``kind``: keys or values)."""
        norm = self.squared_norm[kind]
        return self.squared_error[kind] / norm if norm > 0 else 0.0
