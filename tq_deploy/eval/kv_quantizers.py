"""Key/value quantizers for the evaluation cache, built from a CacheConfig.

Every quantizer here maps a whole [batch, kv_heads, tokens, head_dim] tensor to
its reconstruction x_hat (encode -> decode) in one call; the cache
(cache.py) calls ``quantize_keys`` / ``quantize_values`` once per layer and
chunk with the new tokens only.
"""

from __future__ import annotations

import torch

from tq_deploy.eval.baselines import Int8AbsmaxQuantizer, PerChannelKeyQuantizer, PerTokenAsymmetricQuantizer
from tq_deploy.eval.configs import KIVI_GROUP, CacheConfig
from tq_deploy.eval.naive import NaiveAbsmaxQuantizer
from tq_deploy.reference.quantizer import MixedPrecisionTurboQuant, TurboQuantMSE, TurboQuantProd


class KVQuantizer:
    """Identity: the fp32 baseline. Subclasses replace the two methods."""

    name = "fp32"

    def quantize_keys(self, keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return keys

    def quantize_values(self, values: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return values


class RoundTripKVQuantizer(KVQuantizer):
    """Keys and values each through an object with ``quantize(x) -> x_hat``, the same for every layer."""

    def __init__(self, key_quantizer, value_quantizer, name: str = "round-trip"):
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.name = name

    def quantize_keys(self, keys, layer_idx):
        return self.key_quantizer.quantize(keys)

    def quantize_values(self, values, layer_idx):
        return self.value_quantizer.quantize(values)


class MixedKVQuantizer(KVQuantizer):
    """Outlier-channel mixed precision with channels fixed per (layer, K/V, head).

    A serving engine cannot re-pick outlier channels for every decode step (the
    cached codes would change meaning), so the channels of largest mean |x| are
    chosen once, from the first chunk a layer sees (the prompt), separately for
    every KV head, and then kept for all later tokens of that layer and head.
    """

    def __init__(self, head_dim: int, k_bits: float, v_bits: float, rotation: str = "haar", seed: int = 0):
        self.keys = MixedPrecisionTurboQuant.preset(head_dim, k_bits, seed=seed, rotation=rotation)
        self.values = MixedPrecisionTurboQuant.preset(head_dim, v_bits, seed=seed + 1, rotation=rotation)
        self.channels: dict[tuple[int, str, int], torch.Tensor] = {}
        self.name = "mixed"

    def _quantize(self, quantizer: MixedPrecisionTurboQuant, x: torch.Tensor, layer_idx: int, kind: str):
        if x.dim() != 4:
            raise ValueError(f"{kind} has shape {tuple(x.shape)}, expected [batch, kv_heads, tokens, head_dim]")
        out = torch.empty_like(x)
        for head in range(x.shape[1]):
            key = (layer_idx, kind, head)
            if key not in self.channels:
                magnitude = x[:, head].float().abs().reshape(-1, x.shape[-1]).mean(0)
                self.channels[key] = torch.topk(magnitude, quantizer.outlier_channels).indices.sort().values
            quantizer.outlier_idx = self.channels[key]
            out[:, head] = quantizer.quantize(x[:, head])
        return out

    def quantize_keys(self, keys, layer_idx):
        return self._quantize(self.keys, keys, layer_idx, "keys")

    def quantize_values(self, values, layer_idx):
        return self._quantize(self.values, values, layer_idx, "values")


class CenteredKeys(KVQuantizer):
    """Quantize k - mu instead of k, mu the mean key of a layer's first chunk, per KV head.

    Returns quantize(k - mu) + mu so that the model sees keys on their usual
    scale; attention scores then differ from the deployed form (scores of
    quantize(k - mu) alone) only by q.mu, the same for every key of a query,
    which softmax cancels.
    """

    def __init__(self, inner: KVQuantizer):
        self.inner = inner
        self.name = inner.name
        self.means: dict[int, torch.Tensor] = {}

    def quantize_keys(self, keys, layer_idx):
        if layer_idx not in self.means:
            self.means[layer_idx] = keys.float().mean(dim=(0, 2), keepdim=True).to(keys.dtype)
        mean = self.means[layer_idx]
        return self.inner.quantize_keys(keys - mean, layer_idx) + mean

    def quantize_values(self, values, layer_idx):
        return self.inner.quantize_values(values, layer_idx)


class _Unquantized:
    """One side of a configuration with 32 bits: left as it is."""

    def quantize(self, x):
        return x


def build_kv_quantizer(config: CacheConfig, head_dim: int, seed: int = 0, statistics=None) -> KVQuantizer:
    """The quantizer of ``config`` (``statistics``: the key_transforms.KVStatistics of its calibration text,
    needed when it names a transform). TurboQuant_mse follows the exported model's convention (layer l:
    one rotation of seed + l for keys and values, LayerPlanKVQuantizer); the configurations that
    are not deployed (prod, mixed, int8 with TurboQuant values) rotate keys with ``seed`` and values
    with ``seed + 1`` in every layer."""
    method, rotation = config.method, config.rotation
    if method == "fp32":
        return KVQuantizer()
    if method == "mse":
        quantizer = LayerPlanKVQuantizer.uniform(int(config.k_bits), int(config.v_bits), head_dim, seed, rotation,
                                                 config.name, getattr(torch, config.norm_dtype))
        if config.transform:
            from tq_deploy.eval.key_transforms import TransformedKV

            if statistics is None:
                raise ValueError(f"config {config.name!r} needs the statistics of {config.calibration!r}, "
                                 "expected statistics=key_transforms.collect_statistics(...)")
            return TransformedKV(quantizer, statistics, config.transform)
        return CenteredKeys(quantizer) if config.center_keys else quantizer
    if 32 in (config.k_bits, config.v_bits):
        # Build the quantized side through the same code, leave the other side as it is.
        bits = config.v_bits if config.k_bits == 32 else config.k_bits
        inner = build_kv_quantizer(CacheConfig(method, bits, bits, rotation), head_dim, seed)
        quantizer = RoundTripKVQuantizer(
            _Unquantized() if config.k_bits == 32 else inner.key_quantizer,
            _Unquantized() if config.v_bits == 32 else inner.value_quantizer,
            config.name,
        )
        return CenteredKeys(quantizer) if config.center_keys else quantizer
    if method == "mixed":
        quantizer = MixedKVQuantizer(head_dim, config.k_bits, config.v_bits, rotation, seed)
    elif method == "naive":
        quantizer = RoundTripKVQuantizer(NaiveAbsmaxQuantizer(int(config.k_bits)),
                                         NaiveAbsmaxQuantizer(int(config.v_bits)))
    elif method == "prod":
        quantizer = RoundTripKVQuantizer(TurboQuantProd(head_dim, int(config.k_bits), seed, rotation),
                                         TurboQuantMSE(head_dim, int(config.v_bits), seed + 1, rotation))
    elif method == "kivi":
        quantizer = RoundTripKVQuantizer(PerChannelKeyQuantizer(int(config.k_bits), KIVI_GROUP),
                                         PerTokenAsymmetricQuantizer(int(config.v_bits)))
    elif method == "int8":
        values = Int8AbsmaxQuantizer() if config.v_bits == 8 else \
            TurboQuantMSE(head_dim, int(config.v_bits), seed + 1, rotation)
        quantizer = RoundTripKVQuantizer(Int8AbsmaxQuantizer(), values)
    else:
        raise ValueError(f"config.method={method!r}, expected one of fp32, mse, prod, mixed, naive, kivi, int8")
    quantizer.name = config.name
    return CenteredKeys(quantizer) if config.center_keys else quantizer


class LayerPlanKVQuantizer(KVQuantizer):
    """TurboQuant_mse as the exported model's cache computes it, with its own key and value widths in
    every layer: ``plan[layer] = (k_bits, v_bits)``, or the same pair in every layer (:meth:`uniform`).

    Layer l quantizes its keys and its values with one rotation, make_rotation(head_dim, rotation,
    seed + l), and the Lloyd-Max codebooks of their widths: the exported LLM's layer l holds that
    rotation (its TQCacheUpdate and TQPagedPrefill take one rotation for keys and values) and
    those codebooks (tq_deploy.reference.llama), so eval-ppl and the ONNX model agree on every code.
    A width of 32 leaves that side of that layer unquantized (the calibration probes quantize one
    layer's keys or values and nothing else).
    """

    def __init__(self, plan, head_dim: int, seed: int = 0, rotation: str = "haar", name: str = "plan",
                 norm_dtype: torch.dtype = torch.float32):
        self.plan = None if plan is None else [(int(k), int(v)) for k, v in plan]
        self.head_dim = head_dim
        self.seed = seed
        self.rotation = rotation
        self.norm_dtype = norm_dtype  # the cache's stored norms (float16: rounded as the exported cache does)
        self.name = name
        self._uniform: tuple[int, int] | None = None
        self._sides: dict[tuple[int, int], object] = {}

    @classmethod
    def uniform(cls, k_bits: int, v_bits: int, head_dim: int, seed: int = 0, rotation: str = "haar",
                name: str = "mse", norm_dtype: torch.dtype = torch.float32) -> "LayerPlanKVQuantizer":
        """Keys at ``k_bits`` and values at ``v_bits`` in every layer, however many there are."""
        quantizer = cls(None, head_dim, seed, rotation, name, norm_dtype)
        quantizer._uniform = (int(k_bits), int(v_bits))
        return quantizer

    def _bits(self, layer_idx: int) -> tuple[int, int]:
        if self.plan is None:
            return self._uniform
        if layer_idx >= len(self.plan):
            raise ValueError(f"layer {layer_idx} is not in the plan of {len(self.plan)} layers, "
                             "expected a plan with one entry per model layer")
        return self.plan[layer_idx]

    def _side(self, layer_idx: int, bits: int):
        if bits == 32:
            return _Unquantized()
        key = (layer_idx, bits)
        if key not in self._sides:
            self._sides[key] = TurboQuantMSE(self.head_dim, bits, self.seed + layer_idx, self.rotation,
                                             norm_dtype=self.norm_dtype)
        return self._sides[key]

    def quantize_keys(self, keys, layer_idx):
        return self._side(layer_idx, self._bits(layer_idx)[0]).quantize(keys)

    def quantize_values(self, values, layer_idx):
        return self._side(layer_idx, self._bits(layer_idx)[1]).quantize(values)
