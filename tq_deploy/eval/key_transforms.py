"""Calibrated affine transforms of the cached keys and values that leave attention unchanged.

TurboQuant's error is isotropic after the rotation and sized by ||x||, so whatever part of a
key or value the model could recompute for free is paid for in bits. Two parts can be moved
out of the cache exactly, per (layer, KV head), with vectors fixed after calibration:

* **key mean** mu_k (after RoPE): the cache holds k - mu_k. Every score of a query moves by
  the same q.mu_k, and softmax ignores a common shift.
* **key scale** s_k, one number per RoPE pair (channels i and i + D/2): the cache holds
  (k - mu_k) / s_k and the query is multiplied by s_k, so q.k is unchanged. A scale shared by
  the two channels of a pair commutes with RoPE, so it folds into W_k (1 / s_k) and W_q (s_k).
  The rotated quantization error e (||e|| ~ ||k'||) enters the score as (s_k q).e; with
  a = E[q^2] and b = E[(k - mu_k)^2] per pair, E[((s_k q).e)^2] ~ sum(a s^2) sum(b / s^2),
  smallest at s^2 = sqrt(b / a) (Cauchy-Schwarz).
* **value mean and scale** mu_v, s_v (per channel): the cache holds (v - mu_v) / s_v and the
  attention output is out' * s_v + mu_v: the softmax weights sum to 1, so the mean comes back
  exactly, and s_v folds into W_v (1 / s_v) and W_o's columns (s_v), mu_v into a bias of
  o_proj (W_o mu_v). The output error is W_o (s_v * e): a = the squared column norms of W_o
  over the query heads that read this KV head, b = E[(v - mu_v)^2], the same s^2 = sqrt(b / a).

Nothing per token is stored: the vectors are per-model constants (initializers of an exported
graph), so a configuration's effective bits do not change. The statistics come from
``CALIBRATION_TOKENS`` tokens of a calibration text through the fp32 model.

Two more are not exact without kernel work (:func:`key_options`): the key mean taken **before**
RoPE (``kpc``; the cache holds k_t - R_t mu and attention adds q . R_t mu back: the attention
ops' key mean, :func:`tq_deploy.reference.paged.key_mean_scores`), and the first token (the attention sink) left out of the mean or
out of the quantization. docs/quality.md measures every one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tq_deploy.eval.configs import DEPLOYED_TRANSFORM
from tq_deploy.eval.kv_quantizers import KVQuantizer
from tq_deploy.models.key_mean import CALIBRATION_TOKENS, GENERATED_TEXTS, calibration_tokens  # noqa: F401
from tq_deploy.models.kv_transform import optimal_scale, pair_energy  # noqa: F401 (optimal_scale: API)

def calibration_ids(loaded, source: str, tokens: int = CALIBRATION_TOKENS) -> list:
    """[1, T] token-id tensors to calibrate on: what an export's key mean is measured on
    (tq_deploy.models.key_mean.calibration_tokens): the first ``tokens`` tokens of a shipped text or a
    file, or ``generated``: GENERATED_TEXTS texts that the model samples itself, through the reference
    decoder of the same weights."""
    decoder = None
    if source == "generated":
        from tq_deploy.models.checkpoint import decoder_config, decoder_weights
        from tq_deploy.reference.llama import LlamaDecoder

        decoder = LlamaDecoder(decoder_config(loaded.model.config, cache="float32")).eval()
        decoder.load_weights(decoder_weights(loaded.model, decoder.config))
    texts = calibration_tokens(decoder, source, first_token=getattr(loaded.model.config, "bos_token_id", None),
                               tokenizer=loaded.tokenizer, tokens=tokens)
    return [torch.tensor([text], dtype=torch.long) for text in texts]


_KIND = re.compile(r"^(?:k(?P<kp>p?)(?P<kc>c?)(?P<ks>s?)(?P<k0>[01]?))?(?:v(?P<vc>c?)(?P<vs>s?)(?P<v0>0?))?$")


def parse_transform(kind: str) -> tuple[bool, bool, bool, bool]:
    """``"kcsvc"`` -> (key mean, key scale, value mean, value scale) = (True, True, True, False).

    k then v, each followed by c (mean) and/or s (scale): kc, kcs, ks, vcs, kcsvc, ...; ``kvcs`` is
    all four."""
    if kind == "kvcs":
        return (True, True, True, True)
    match = _KIND.match(kind or "")
    parts = tuple(bool(match[g]) for g in ("kc", "ks", "vc", "vs")) if match else ()
    # "k" or "v" alone moves nothing; so does an empty kind; p (before RoPE) needs c.
    if not any(parts) or ("k" in kind and not (parts[0] or parts[1])) or \
            ("v" in kind and not (parts[2] or parts[3])) or (match["kp"] and not match["kc"]):
        raise ValueError(f"transform={kind!r}, expected k and/or v, each followed by c (mean) and/or s (scale), "
                         "k's mean optionally before RoPE (kpc), 0 after k or v: its first token kept (1 after k: "
                         "the first key quantized without the mean), e.g. 'kc', 'kcs', 'kpc1', 'vcs', 'kvcs'")
    return parts


def key_options(kind: str) -> tuple[bool, str | bool, bool]:
    """(key mean taken before RoPE, what happens to the first token's key, first token's value kept) of ``kind``:
    the key's is "0" (kept unquantized), "1" (quantized as it is, not centered: the mean starts at
    position 1) or False.

    Before RoPE the mean key is the same at every position; after RoPE it turns with the position, so
    one post-RoPE vector removes only the slowly turning pairs. The cache then holds
    k_t - R_t mu (R_t: RoPE at position t) and attention must add R_t mu back to every key it reads:
    the score shift q.R_t mu differs between positions, so softmax does not cancel it (kernel work).
    The first token of a sequence is the attention sink of most heads: a small key that takes much of
    the attention, whose error centering would multiply (||k_0 - mu|| >> ||k_0||)."""
    if kind == "kvcs":
        return (False, False, False)
    parse_transform(kind)
    match = _KIND.match(kind)
    return (bool(match["kp"]), match["k0"] or False, bool(match["v0"]))


@dataclass
class KVStatistics:
    """Per layer [kv_heads, head_dim] tensors (float32) measured on ``source``."""

    source: str
    tokens: int
    key_mean: list
    key_scale: list  # for centered keys; key_scale_raw for keys left as they are
    value_mean: list
    value_scale: list
    key_scale_raw: list
    value_scale_raw: list
    key_mean_pre: list | None = None  # before RoPE
    key_scale_pre: list | None = None  # for keys centered before RoPE
    rope: object = None  # positions [T] -> (cos, sin) [T, D], the model's rotary embedding


# One definition of the pair energy and the scale, shared with tq_deploy.models.kv_transform.
_pair_sum = pair_energy


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def rope_callable(model):
    """positions [T] -> (cos, sin) [T, D] float32 of ``model``'s own rotary embedding."""
    rotary = model.model.rotary_emb

    def rope(positions: torch.Tensor):
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        cos, sin = rotary(probe, positions[None])
        return cos[0].float(), sin[0].float()

    return rope


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE at the positions of cos/sin ([T, D]) on x [..., T, D]; ``inverse`` turns it back."""
    return x * cos + _rotate_half(x) * (-sin if inverse else sin)


class _Recorder(KVQuantizer):
    """Identity cache quantizer that sums the keys and values (and their squares) per layer and KV head,
    and the keys turned back to before RoPE (positions counted per layer from 0)."""

    name = "fp32"

    def __init__(self, rope=None):
        self.sums: dict[tuple[int, str], list] = {}
        self.rope = rope
        self.position: dict[int, int] = {}

    def _add(self, x, layer_idx, kind):
        xf = x.detach().double()[0]  # [kv_heads, tokens, D]
        entry = self.sums.setdefault((layer_idx, kind), [0.0, 0.0, 0])
        entry[0] = entry[0] + xf.sum(1)
        entry[1] = entry[1] + xf.pow(2).sum(1)
        entry[2] += xf.shape[1]

    def quantize_keys(self, keys, layer_idx):
        self._add(keys, layer_idx, "k")
        if self.rope is not None:
            start = self.position.get(layer_idx, 0)
            cos, sin = self.rope(torch.arange(start, start + keys.shape[-2], device=keys.device))
            self._add(apply_rope(keys.float(), cos, sin, inverse=True), layer_idx, "kpre")
            self.position[layer_idx] = start + keys.shape[-2]
        return keys

    def new_sequence(self):
        self.position = {}

    def quantize_values(self, values, layer_idx):
        self._add(values, layer_idx, "v")
        return values


def _attention_modules(model):
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


@torch.no_grad()
def collect_statistics(loaded, input_ids, source: str, chunk_size: int = 256) -> KVStatistics:
    """Means and optimal scales of every layer's keys and values on ``input_ids`` (fp32 cache): one [1, T]
    tensor or a list of them (each its own sequence; the statistics pool all their tokens)."""
    from tq_deploy.eval.perplexity import perplexity

    sequences = [input_ids] if isinstance(input_ids, torch.Tensor) else list(input_ids)

    heads, kv_heads, dim = loaded.num_q_heads, loaded.num_kv_heads, loaded.head_dim
    group = heads // kv_heads
    query_energy: dict[int, torch.Tensor] = {}
    hooks = []
    for idx, attn in enumerate(_attention_modules(loaded.model)):
        def hook(_module, _inputs, output, idx=idx):
            # Pre-RoPE queries: RoPE rotates each pair, so a pair's energy is the same after it.
            q = output.detach().double().reshape(-1, heads, dim)
            query_energy[idx] = query_energy.get(idx, 0.0) + q.pow(2).sum(0)
        hooks.append(attn.q_proj.register_forward_hook(hook))
    rope = rope_callable(loaded.model)
    recorder = _Recorder(rope)
    try:
        for ids in sequences:
            recorder.new_sequence()
            perplexity(loaded.model, ids, recorder, chunk_size)
    finally:
        for handle in hooks:
            handle.remove()
    tokens = sum(ids.shape[1] for ids in sequences)
    stats = KVStatistics(source, tokens, [], [], [], [], [], [], [], [], rope)
    for layer, attn in enumerate(_attention_modules(loaded.model)):
        out = {}
        for kind in ("k", "v", "kpre"):
            total, squares, count = recorder.sums[(layer, kind)]
            mean = total / count
            out[kind] = (mean, squares / count - mean.pow(2), squares / count)
        q_energy = (query_energy[layer] / tokens).reshape(kv_heads, group, dim).sum(1)
        w_o = attn.o_proj.weight.detach().double()  # [hidden, heads * dim]
        column_energy = w_o.pow(2).sum(0).reshape(kv_heads, group, dim).sum(1)
        stats.key_mean.append(out["k"][0].float())
        stats.key_scale.append(optimal_scale(_pair_sum(q_energy), _pair_sum(out["k"][1])))
        stats.value_mean.append(out["v"][0].float())
        stats.value_scale.append(optimal_scale(column_energy, out["v"][1]))
        stats.key_scale_raw.append(optimal_scale(_pair_sum(q_energy), _pair_sum(out["k"][2])))
        stats.value_scale_raw.append(optimal_scale(column_energy, out["v"][2]))
        stats.key_mean_pre.append(out["kpre"][0].float())
        stats.key_scale_pre.append(optimal_scale(_pair_sum(q_energy), _pair_sum(out["kpre"][1])))
    return stats


class TransformedKV(KVQuantizer):
    """``inner`` quantizes (x - mu) / s; the model gets back x_hat * s + mu.

    What the model computes from that equals the deployed form (queries times s_k, keys and values
    stored as (x - mu) / s, output times s_v plus mu_v) up to the common shift q.mu_k of every
    score of a query, which softmax cancels.
    """

    def __init__(self, inner: KVQuantizer, stats: KVStatistics, kind: str):
        self.key_mean, self.key_scale, self.value_mean, self.value_scale = parse_transform(kind)
        self.pre_rope, self.keep_first, self.keep_first_value = key_options(kind)
        self.value_position: dict[int, int] = {}
        self.inner = inner
        self.stats = stats
        self.kind = kind
        self.name = inner.name
        self.position: dict[int, int] = {}  # tokens seen per layer (positions of the next keys)

    def _parts(self, x, layer_idx, mean_on, scale_on, means, scales):
        if layer_idx >= len(means):
            raise ValueError(f"layer {layer_idx} has no calibration statistics ({len(means)} layers calibrated on "
                             f"{self.stats.source!r}), expected the model they were measured on")
        mean = means[layer_idx].to(x.device, x.dtype)[None, :, None, :] if mean_on else None
        scale = scales[layer_idx].to(x.device, x.dtype)[None, :, None, :] if scale_on else None
        return mean, scale

    def _apply(self, x, layer_idx, mean, scale, quantize):
        y = x if mean is None else x - mean
        y = y if scale is None else y / scale
        y_hat = quantize(y, layer_idx)
        y_hat = y_hat if scale is None else y_hat * scale
        return y_hat if mean is None else y_hat + mean

    def quantize_keys(self, keys, layer_idx):
        start = self.position.get(layer_idx, 0)
        self.position[layer_idx] = start + keys.shape[-2]
        if self.pre_rope:
            mean, scale = self._parts(keys, layer_idx, True, self.key_scale, self.stats.key_mean_pre,
                                      self.stats.key_scale_pre)
            cos, sin = self.stats.rope(torch.arange(start, start + keys.shape[-2], device=keys.device))
            mean = apply_rope(mean, cos.to(keys.dtype), sin.to(keys.dtype))  # R_t mu: [1, H, T, D]
        else:
            mean, scale = self._parts(keys, layer_idx, self.key_mean, self.key_scale, self.stats.key_mean,
                                      self.stats.key_scale if self.key_mean else self.stats.key_scale_raw)
        out = self._apply(keys, layer_idx, mean, scale, self.inner.quantize_keys)
        if self.keep_first == "0" and start == 0:
            out = out.clone()
            out[..., 0, :] = keys[..., 0, :]
        elif self.keep_first == "1" and start == 0:
            out = out.clone()
            out[..., :1, :] = self.inner.quantize_keys(keys[..., :1, :], layer_idx)
        return out

    def quantize_values(self, values, layer_idx):
        mean, scale = self._parts(values, layer_idx, self.value_mean, self.value_scale, self.stats.value_mean,
                                  self.stats.value_scale if self.value_mean else self.stats.value_scale_raw)
        out = self._apply(values, layer_idx, mean, scale, self.inner.quantize_values)
        start = self.value_position.get(layer_idx, 0)
        self.value_position[layer_idx] = start + values.shape[-2]
        if self.keep_first_value and start == 0:
            out = out.clone()
            out[..., 0, :] = values[..., 0, :]
        return out


def with_key_mean(quantizer: KVQuantizer, stats: KVStatistics | None) -> KVQuantizer:
    """``quantizer`` storing its keys without the key mean of ``stats`` as an exported model does
    (DEPLOYED_TRANSFORM); ``stats`` None: ``quantizer`` as it is."""
    return quantizer if stats is None else TransformedKV(quantizer, stats, DEPLOYED_TRANSFORM)


class DeployedKV(KVQuantizer):
    """The cache side of a model folded by :func:`fold_into_weights`: ``inner`` quantizes x - offset
    (the Sub of an initializer before TQCacheUpdate) and nothing is added back."""

    def __init__(self, inner: KVQuantizer, key_offset: list, value_offset: list):
        self.inner, self.key_offset, self.value_offset = inner, key_offset, value_offset
        self.name = inner.name

    def quantize_keys(self, keys, layer_idx):
        offset = self.key_offset[layer_idx].to(keys.device, keys.dtype)[None, :, None, :]
        return self.inner.quantize_keys(keys - offset, layer_idx)

    def quantize_values(self, values, layer_idx):
        offset = self.value_offset[layer_idx].to(values.device, values.dtype)[None, :, None, :]
        return self.inner.quantize_values(values - offset, layer_idx)


@torch.no_grad()
def fold_into_weights(model, stats: KVStatistics, kind: str, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """How a deployed model carries the transform ``kind``: the scales folded into a copy of ``model``'s
    q/k/v/o projections, the value mean into an o_proj bias, and per layer the [kv_heads, head_dim]
    offsets (mu_k / s_k, mu_v / s_v) to subtract before the cache. Returns (model copy, key offsets,
    value offsets); with :class:`DeployedKV` it computes what :class:`TransformedKV` does, exactly
    up to float rounding and the common score shift q.mu_k."""
    import copy

    key_mean, key_scale, value_mean, value_scale = parse_transform(kind)
    if any(key_options(kind)):
        raise ValueError(f"transform={kind!r} needs the attention to add R_t mu back per position or to keep the "
                         "first token (kernel work), expected one that folds: kc, kcs, vcs, kvcs, ...")
    folded = copy.deepcopy(model)
    group = num_q_heads // num_kv_heads
    key_offsets, value_offsets = [], []
    for layer, attn in enumerate(_attention_modules(folded)):
        zero = torch.zeros(num_kv_heads, head_dim)
        one = torch.ones(num_kv_heads, head_dim)
        s_k = (stats.key_scale[layer] if key_mean else stats.key_scale_raw[layer]) if key_scale else one
        s_v = (stats.value_scale[layer] if value_mean else stats.value_scale_raw[layer]) if value_scale else one
        mu_k = stats.key_mean[layer] if key_mean else zero
        mu_v = stats.value_mean[layer] if value_mean else zero
        q_factor = s_k.repeat_interleave(group, 0).reshape(-1, 1)  # query head j reads KV head j // group
        for proj, factor in ((attn.q_proj, q_factor), (attn.k_proj, 1 / s_k.reshape(-1, 1)),
                             (attn.v_proj, 1 / s_v.reshape(-1, 1))):
            proj.weight.mul_(factor.to(proj.weight.dtype))
            if proj.bias is not None:
                proj.bias.mul_(factor.reshape(-1).to(proj.bias.dtype))
        o = attn.o_proj
        mean_out = o.weight @ mu_v.repeat_interleave(group, 0).reshape(-1).to(o.weight.dtype)
        o.weight.mul_(s_v.repeat_interleave(group, 0).reshape(1, -1).to(o.weight.dtype))
        if value_mean:
            if o.bias is None:
                o.bias = torch.nn.Parameter(torch.zeros(o.weight.shape[0], dtype=o.weight.dtype,
                                                        device=o.weight.device))
            o.bias.add_(mean_out)
        key_offsets.append(mu_k / s_k)
        value_offsets.append(mu_v / s_v)
    return folded, key_offsets, value_offsets

