"""A Llama-family decoder whose attention runs over a TurboQuant paged KV cache.

The decoder of Llama (Touvron et al., 2023), with grouped-query attention and the
Qwen2 / Mistral variants that differ from it only in configuration. One forward
call is one step of generation on packed ("varlen") tokens, vLLM style: a
prefill chunk of any length per sequence, or a decode step of one token each.

    h = embed(input_ids)                                          [T, H]
    cos, sin = rotary(positions)                                  theta, rope scaling
    per layer l:
        x = RMSNorm(h)
        q, k, v = x Wq (+bq), x Wk (+bk), x Wv (+bv)              GQA: Hq query, Hkv KV heads
        k = k - mu_l  (positions >= 1; with a key mean)             mu_l: [Hkv, D], before RoPE
        q, k = q cos + rotate_half(q) sin, k cos + rotate_half(k) sin
        cache_l <- TQCacheUpdate(k, v, slot_mapping)              the new tokens are written first,
        a = TQPagedPrefill(q, cache_l, query_start, ...          then attended to, causally; with a
                           [, mu_l, inv_freq])                    key mean it adds q . R_t mu_l back
        h = h + a Wo
        x = RMSNorm(h)
        h = h + (silu(x Wgate) * (x Wup)) Wdown                   SwiGLU
    logits = RMSNorm(h[logits_index]) Wlm                         Wlm = embed^T when tied

The rows picked by ``logits_index`` go through the final norm alone: the norm is
per row, so this is the full model's logits at those rows (a generation step
needs only each sequence's last row).

Each layer has its own rotation (seed + layer) and its own key/value widths (a
per-layer bit plan). The two cache steps are injected (``ops``), as in
:mod:`tq_deploy.reference.model`: the reference by default, the export's opaque
ops when tracing to ONNX. With ``cache="float32"`` the cache keeps keys and
values unquantized (:mod:`tq_deploy.reference.float_cache`), which is the
checkpoint's own computation: the check of this module against transformers.

With ``key_mean`` each layer holds a fixed mean key mu_l (before RoPE, per KV head,
calibrated once: :mod:`tq_deploy.models.key_mean`): the cache stores the keys at
positions >= 1 without it, which quantizes with a fraction of the error where
keys share large channels, and the attention adds it back exactly (ops.py). The
model computes the same function with or without it, up to quantization.

Graph inputs, in order (the exported LLM's interface; S sequences, T new tokens, M block-table
columns, N cache blocks, R logit rows):
    input_ids [T] int64, positions [T] int64, slot_mapping [T] int64, query_start [S+1] int32,
    block_tables [S, M] int32, context_lens [S] int32 (new tokens included), logits_index [R] int64,
    then per layer l: k_codes.l, k_norms.l, v_codes.l, v_norms.l (k_cache.l, v_cache.l for float32)
Outputs: logits [R, V] float32, then the updated caches (k_codes_out.l, ...).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from tq_deploy.reference.checks import check_bits, check_head_dim
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.float_cache import allocate_float_cache, float_cache_update, float_paged_prefill
from tq_deploy.reference.paged import allocate_cache, cache_update_reference, paged_prefill_reference
from tq_deploy.reference.rotation import make_rotation

ROPE_TYPES = ("default", "linear", "llama3")
CACHE_KINDS = ("turboquant", "float32")
NORM_DTYPE_NAMES = ("float32", "float16")  # the turboquant cache's norm types (ops.py: TN)
STEP_INPUT_NAMES = ("input_ids", "positions", "slot_mapping", "query_start", "block_tables", "context_lens",
                    "logits_index")
TQ_CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")
FLOAT_CACHE_NAMES = ("k_cache", "v_cache")
# Keys each rope type reads (transformers' names); anything else in rope_scaling is ignored.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}, expected an int >= 1")
    return value


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}, expected a finite number > 0")
    return float(value)


def normalize_rope_scaling(rope_scaling) -> dict | None:
    """transformers' rope scaling dict reduced to what the rotary embedding reads; None for plain RoPE.

    Accepts the "rope_type" key or the older "type"; a type other than ROPE_TYPES (dynamic NTK, YaRN,
    LongRoPE: position- or length-dependent) is refused rather than computed wrongly."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling={rope_scaling!r}, expected a dict or None")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={kind!r}, expected one of {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return None
    out = {"rope_type": kind}
    for key in _ROPE_KEYS[kind]:
        if key not in rope_scaling:
            raise ValueError(f"rope_scaling of rope_type {kind!r} has no {key!r}, expected keys {_ROPE_KEYS[kind]}")
        out[key] = _positive_float(f"rope_scaling {key}", rope_scaling[key])
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"rope_scaling high_freq_factor={out['high_freq_factor']}, expected > "
                         f"low_freq_factor={out['low_freq_factor']}")
    return out


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-family decoder and its TurboQuant cache (names follow the paper, values transformers')."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None (plain RoPE) or {"rope_type": "linear" | "llama3", ...}
    attention_bias: bool = False  # biases of the q/k/v projections (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # bias of the output projection (Llama's attention_bias; never Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    block_size: int = 16
    k_bits: int = 4
    v_bits: int = 4
    layer_bits: tuple | None = None  # one (k_bits, v_bits) pair per layer; None: every layer k_bits/v_bits
    seed: int = 0
    rotation: str = "haar"
    cache: str = "turboquant"  # or "float32": unquantized keys and values (the check against the checkpoint)
    key_mean: bool = False  # a per-layer mean key (before RoPE) stored apart from the cached keys
    norm_dtype: str = "float32"  # the turboquant cache's norms: "float32" or "float16" (16/D bits less per coordinate)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_q_heads", "num_kv_heads",
                     "max_position_embeddings", "block_size"):
            _positive_int(name, getattr(self, name))
        check_head_dim("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}, expected an even number for the rotary embedding")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads}, expected a multiple of num_kv_heads={self.num_kv_heads}")
        _positive_float("rms_norm_eps", self.rms_norm_eps)
        _positive_float("rope_theta", self.rope_theta)
        object.__setattr__(self, "rope_scaling", normalize_rope_scaling(self.rope_scaling))
        check_bits("k_bits", self.k_bits)
        check_bits("v_bits", self.v_bits)
        if self.layer_bits is not None:
            try:
                pairs = tuple((k, v) for k, v in self.layer_bits)  # lists from JSON metadata become tuples
            except (TypeError, ValueError):
                raise ValueError(f"layer_bits={self.layer_bits!r:.80}, expected one (k_bits, v_bits) pair per layer") \
                    from None
            if len(pairs) != self.num_layers:
                raise ValueError(f"layer_bits has {len(pairs)} entries, expected num_layers={self.num_layers}")
            for i, (k, v) in enumerate(pairs):
                check_bits(f"layer_bits[{i}] k_bits", k)
                check_bits(f"layer_bits[{i}] v_bits", v)
            if len(set(pairs)) == 1:  # one width for all: one canonical form
                object.__setattr__(self, "k_bits", pairs[0][0])
                object.__setattr__(self, "v_bits", pairs[0][1])
                pairs = None
            object.__setattr__(self, "layer_bits", pairs)
        if self.rotation not in ("haar", "hadamard"):
            raise ValueError(f"rotation={self.rotation!r}, expected 'haar' or 'hadamard'")
        if self.cache not in CACHE_KINDS:
            raise ValueError(f"cache={self.cache!r}, expected one of {CACHE_KINDS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}, expected an int >= 0")
        if not isinstance(self.key_mean, bool):
            raise ValueError(f"key_mean={self.key_mean!r}, expected True or False")
        if self.norm_dtype not in NORM_DTYPE_NAMES:
            raise ValueError(f"norm_dtype={self.norm_dtype!r}, expected one of {NORM_DTYPE_NAMES}")
        if self.key_mean and self.cache != "turboquant":
            raise ValueError(f"key_mean=True with cache={self.cache!r}, expected the turboquant cache (a float cache "
                             "stores keys as they are)")

    def bits_of_layer(self, layer: int) -> tuple[int, int]:
        """(k_bits, v_bits) of ``layer``."""
        return self.layer_bits[layer] if self.layer_bits is not None else (self.k_bits, self.v_bits)

    @property
    def caches_per_layer(self) -> int:
        return len(TQ_CACHE_NAMES) if self.cache == "turboquant" else len(FLOAT_CACHE_NAMES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DecoderConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"decoder config has keys {unknown}, expected only {sorted(known)}")
        return cls(**values)


def input_names(config: DecoderConfig) -> tuple[str, ...]:
    """Graph inputs: the step inputs, then each layer's cache tensors ``<name>.<layer>``."""
    names = TQ_CACHE_NAMES if config.cache == "turboquant" else FLOAT_CACHE_NAMES
    return STEP_INPUT_NAMES + tuple(f"{n}.{i}" for i in range(config.num_layers) for n in names)


def output_names(config: DecoderConfig) -> tuple[str, ...]:
    names = TQ_CACHE_NAMES if config.cache == "turboquant" else FLOAT_CACHE_NAMES
    return ("logits",) + tuple(f"{n}_out.{i}" for i in range(config.num_layers) for n in names)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """The D/2 rotation rates of RoPE, float32: theta^(-2i/D), rescaled as rope_scaling says.

    linear: every rate divided by the factor (positions interpolated).
    llama3 (Llama 3.1): wavelengths longer than original_max / low_freq_factor are stretched by the
    factor, those shorter than original_max / high_freq_factor are kept, and those between are blended
    linearly in original_max / wavelength."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_scaling is None:
        return inv_freq
    factor = rope_scaling["factor"]
    if rope_scaling["rope_type"] == "linear":
        return inv_freq / factor
    original = rope_scaling["original_max_position_embeddings"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * stretched / factor + blend * stretched
    between = ~(wavelength < original / high) & ~(wavelength > original / low)
    return torch.where(between, blended, stretched)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] turned by its position's angles (cos, sin [T, 1, D], float32), in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside the block (the layers drawing their rotations, tests of small
    models): a small QR (64 x 64) is hundreds of times slower on a busy machine's oversubscribed
    OpenMP pool than on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A projection whose weights the checkpoint provides: no random initialization (seconds at 100M+
    weights); LlamaDecoder zeroes them."""
    return skip_init(nn.Linear, in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the statistics in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaOps:
    """The two TurboQuant cache steps as the reference computes them."""

    cache_update = staticmethod(cache_update_reference)
    paged_prefill = staticmethod(paged_prefill_reference)


class Attention(nn.Module):
    """GQA self-attention of one layer over its paged cache."""

    def __init__(self, config: DecoderConfig, layer: int, ops):
        super().__init__()
        c = config
        self.config, self.ops = c, ops
        self.k_bits, self.v_bits = c.bits_of_layer(layer)
        self.q_proj = _linear(c.hidden_size, c.num_q_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = _linear(c.num_q_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias)
        if c.cache == "turboquant":
            self.register_buffer("rotation", make_rotation(c.head_dim, c.rotation, c.seed + layer))
            self.register_buffer("k_codebook", lloyd_max_codebook(c.head_dim, self.k_bits))
            self.register_buffer("v_codebook", lloyd_max_codebook(c.head_dim, self.v_bits))
        if c.key_mean:  # zeros until calibrated or loaded (a zero mean changes nothing)
            self.register_buffer("key_mean", torch.zeros(c.num_kv_heads, c.head_dim))

    def forward(self, x, cos, sin, slot_mapping, query_start, block_tables, context_lens, caches, mean_rows=None,
                inv_freq=None):
        """``mean_rows`` [T, 1, 1] (1 where a token's position is >= 1) and ``inv_freq`` come with a key mean."""
        c = self.config
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).reshape(t, c.num_q_heads, c.head_dim), cos, sin)
        k = self.k_proj(x).reshape(t, c.num_kv_heads, c.head_dim)
        if c.key_mean:
            k = k - self.key_mean.to(k.dtype) * mean_rows.to(k.dtype)
        k = apply_rope(k, cos, sin)
        v = self.v_proj(x).reshape(t, c.num_kv_heads, c.head_dim)
        if c.cache == "turboquant":
            caches = self.ops.cache_update(k, v, slot_mapping, *caches, self.rotation, self.k_codebook,
                                           self.v_codebook, self.k_bits, self.v_bits)
            mean = (self.key_mean, inv_freq) if c.key_mean else ()
            attn = self.ops.paged_prefill(q, *caches, block_tables, context_lens, query_start, self.rotation,
                                          self.k_codebook, self.v_codebook, self.k_bits, self.v_bits, 0.0, *mean)
        else:
            caches = float_cache_update(k, v, slot_mapping, *caches)
            attn = float_paged_prefill(q, *caches, block_tables, context_lens, query_start)
        return self.o_proj(attn.reshape(t, c.num_q_heads * c.head_dim).to(x.dtype)), caches


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int, ops):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, cos, sin, slot_mapping, query_start, block_tables, context_lens, caches, *mean):
        attn, caches = self.self_attn(self.input_layernorm(h), cos, sin, slot_mapping, query_start, block_tables,
                                      context_lens, caches, *mean)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), caches


class LlamaDecoder(nn.Module):
    """The decoder of the module docstring; forward returns (logits, *updated caches).

    Parameter names are transformers' without the ``model.`` prefix (``embed_tokens.weight``,
    ``layers.3.self_attn.q_proj.weight``, ``norm.weight``, ``lm_head.weight`` unless tied), so a
    checkpoint's state dict loads by name (:meth:`load_weights`). Weights start as zeros."""

    def __init__(self, config: DecoderConfig, ops=LlamaOps):
        super().__init__()
        self.config = c = config
        self.embed_tokens = skip_init(nn.Embedding, c.vocab_size, c.hidden_size)
        with one_thread():
            self.layers = nn.ModuleList(DecoderLayer(c, i, ops) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else _linear(c.hidden_size, c.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def load_weights(self, weights: dict) -> None:
        """Copy ``weights`` (name -> tensor, names as :meth:`named_parameters`) into the parameters;
        a missing, extra or mis-shaped weight is one error naming it."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(weights))
        extra = sorted(set(weights) - set(params))
        if missing or extra:
            raise ValueError(f"checkpoint weights: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                             f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}; expected exactly the "
                             f"{len(params)} weights of the decoder config")
        with torch.no_grad():
            for name, p in params.items():
                w = weights[name]
                if tuple(w.shape) != tuple(p.shape):
                    raise ValueError(f"checkpoint weight {name} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
                p.copy_(w.to(p.dtype))

    def cast_weights(self, dtype: torch.dtype) -> "LlamaDecoder":
        """Weights to ``dtype``; the rotations, codebooks and RoPE rates stay float32."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] float32 of each token's position (both halves of D share the rates)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()

    def forward(self, input_ids, positions, slot_mapping, query_start, block_tables, context_lens, logits_index,
                *caches):
        c = self.config
        per = c.caches_per_layer
        if len(caches) != per * c.num_layers:
            raise ValueError(f"{len(caches)} cache tensors, expected {per} per layer ({per * c.num_layers})")
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        mean = ((positions > 0)[:, None, None], self.inv_freq) if c.key_mean else ()
        updated = []
        for i, layer in enumerate(self.layers):
            h, layer_caches = layer(h, cos, sin, slot_mapping, query_start, block_tables, context_lens,
                                    caches[per * i:per * (i + 1)], *mean)
            updated.extend(layer_caches)
        h = self.norm(h.index_select(0, logits_index))
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (F.linear(h, weight).float(), *updated)


def allocate_caches(config: DecoderConfig, num_blocks: int, device=None) -> list[torch.Tensor]:
    """Zeroed caches of every layer, flat in input order (k_codes.0, k_norms.0, ... or k_cache.0, v_cache.0, ...)."""
    out = []
    for layer in range(config.num_layers):
        if config.cache == "turboquant":
            k_bits, v_bits = config.bits_of_layer(layer)
            out.extend(allocate_cache(num_blocks, config.block_size, config.num_kv_heads, config.head_dim,
                                      k_bits, v_bits, device, getattr(torch, config.norm_dtype)).tensors())
        else:
            out.extend(allocate_float_cache(num_blocks, config.block_size, config.num_kv_heads, config.head_dim,
                                            device))
    return out


def step_inputs(new_tokens, cached, block_tables: torch.Tensor, block_size: int, all_logits: bool = False,
                device=None) -> dict:
    """The step inputs of one call: sequence s holds ``cached[s]`` tokens and appends ``new_tokens[s]``
    (a list of token ids, possibly empty) at positions cached[s] .. ; its slots come from
    ``block_tables[s]``. Logits of each non-empty sequence's last new token, or of every row."""
    if len(new_tokens) != len(cached) or len(cached) != block_tables.shape[0]:
        raise ValueError(f"{len(new_tokens)} token lists, {len(cached)} cached counts and "
                         f"{block_tables.shape[0]} block-table rows, expected one of each per sequence")
    ids, positions, slots, starts = [], [], [], [0]
    for s, (tokens, first) in enumerate(zip(new_tokens, cached)):
        for j, token in enumerate(tokens):
            p = first + j
            if p // block_size >= block_tables.shape[1]:
                raise ValueError(f"sequence {s} position {p}, expected < block_tables.shape[1] * block_size = "
                                 f"{block_tables.shape[1] * block_size}")
            ids.append(int(token))
            positions.append(p)
            slots.append(int(block_tables[s, p // block_size]) * block_size + p % block_size)
        starts.append(starts[-1] + len(tokens))
    last = [starts[s + 1] - 1 for s in range(len(cached)) if starts[s + 1] > starts[s]]
    inputs = {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_start": torch.tensor(starts, dtype=torch.int32),
        "block_tables": block_tables.to(torch.int32),
        "context_lens": torch.tensor([c + len(t) for c, t in zip(cached, new_tokens)], dtype=torch.int32),
        "logits_index": torch.arange(len(ids), dtype=torch.int64) if all_logits
        else torch.tensor(last, dtype=torch.int64),
    }
    return {name: t.to(device) for name, t in inputs.items()}
