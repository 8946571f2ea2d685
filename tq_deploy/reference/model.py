"""A reference decode step with a TurboQuant paged KV cache.

One attention block as a serving engine runs it for one new token per
sequence:

    q, k, v = split(W_qkv h)              QKV projection
    q, k    = rope(q, pos), rope(k, pos)  rotary embedding (rotate-half form)
    cache  <- TQCacheUpdate(k, v)         encode the new token into its slot
    a       = TQPagedAttention(q, cache)  attention over the compressed cache
    out     = W_o a                       output projection

A decode step of ``num_layers`` layers (TQDecodeStack) runs that block once
per layer, each layer's output being the next layer's hidden state; every
layer has its own paged cache, its own weights and rotation (seed + layer) and
its own key/value widths (``layer_bits``: a per-layer bit plan).

Weights, the rotation Pi and the codebooks are deterministic from the
config's seed, so the exported ONNX model and this module agree bit for bit
on their parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from tq_deploy.reference.checks import check_bits, check_head_dim, check_seed
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.paged import allocate_cache, cache_update_reference, paged_attention_reference
from tq_deploy.reference.rotation import make_rotation


@dataclass(frozen=True)
class TQModelConfig:
    hidden_size: int = 256
    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    k_bits: int = 4
    v_bits: int = 4
    block_size: int = 16
    num_blocks: int = 64
    max_blocks_per_seq: int = 16
    rope_theta: float = 10000.0
    seed: int = 0
    rotation: str = "haar"
    num_layers: int = 1
    # Per-layer (k_bits, v_bits), one pair per layer; None: every layer takes k_bits and v_bits.
    layer_bits: tuple | None = None

    def __post_init__(self):
        check_head_dim("head_dim", self.head_dim)
        check_bits("k_bits", self.k_bits)
        check_bits("v_bits", self.v_bits)
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers!r}, expected an int >= 1")
        if self.layer_bits is not None:
            try:
                pairs = tuple((k, v) for k, v in self.layer_bits)  # lists from JSON metadata become tuples
            except (TypeError, ValueError):
                raise ValueError(f"layer_bits={self.layer_bits!r}, expected one (k_bits, v_bits) pair per layer") from None
            if len(pairs) != self.num_layers:
                raise ValueError(f"layer_bits has {len(pairs)} entries, expected num_layers={self.num_layers}")
            for i, (k, v) in enumerate(pairs):
                check_bits(f"layer_bits[{i}] k_bits", k)
                check_bits(f"layer_bits[{i}] v_bits", v)
            object.__setattr__(self, "layer_bits", pairs)
            if self.num_layers == 1:  # one layer: its widths are k_bits and v_bits (one canonical form)
                object.__setattr__(self, "k_bits", pairs[0][0])
                object.__setattr__(self, "v_bits", pairs[0][1])
                object.__setattr__(self, "layer_bits", None)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}, expected an even number for the rotary embedding")
        for name in ("hidden_size", "num_q_heads", "num_kv_heads", "block_size", "num_blocks", "max_blocks_per_seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}, expected an int >= 1")
        check_seed("seed", self.seed)
        if self.rotation not in ("haar", "hadamard"):
            raise ValueError(f"rotation={self.rotation!r}, expected 'haar' or 'hadamard'")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta={self.rope_theta!r}, expected a finite number > 0")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads}, expected a multiple of num_kv_heads={self.num_kv_heads}")

    def bits_of_layer(self, layer: int) -> tuple[int, int]:
        """(k_bits, v_bits) of ``layer``."""
        return self.layer_bits[layer] if self.layer_bits is not None else (self.k_bits, self.v_bits)

    def layer_config(self, layer: int) -> "TQModelConfig":
        """The one-layer config of ``layer`` in a stack: its widths, weights and rotation from seed + layer."""
        k_bits, v_bits = self.bits_of_layer(layer)
        return replace(self, k_bits=k_bits, v_bits=v_bits, num_layers=1, layer_bits=None, seed=self.seed + layer)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TQModelConfig":
        """The config of a dict (model metadata): unknown keys and wrong types are a ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"model config {values!r:.60}, expected a JSON object of TQModelConfig fields")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model config has keys {unknown}, expected a subset of "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**values)


def rotate_half_matrix(dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """R [D, D] with x @ R = rotate_half(x) = (-x[D/2:], x[:D/2]): a signed permutation, so the
    product is exact and exports as one MatMul."""
    eye = torch.eye(dim // 2, dtype=dtype, device=device)
    zero = torch.zeros_like(eye)
    return torch.cat((torch.cat((zero, eye), 1), torch.cat((-eye, zero), 1)), 0)  # [[0, I], [-I, 0]]


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x * cos + rotate_half(x) * sin; x [S, H, D].

    Pair (x_i, x_{i+D/2}) turns by pos * theta^(-i/(D/2)); both halves of the angle row carry the
    same rates, so cos and sin are taken once over [S, 1, D]."""
    dim = x.shape[-1]
    half = dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.to(torch.float32)[:, None, None] * torch.cat((inv_freq, inv_freq))  # [S, 1, D]
    rotated = x @ rotate_half_matrix(dim, x.dtype, x.device)
    return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class ReferenceOps:
    """The two cache ops of the decode step, as the reference computes them."""

    cache_update = staticmethod(cache_update_reference)
    paged_attention = staticmethod(paged_attention_reference)


def check_step_inputs(s: int, positions, slot_mapping, context_lens) -> None:
    """The per-sequence inputs of one decode step of ``s`` sequences: integer vectors of length S
    (a [1] or [S, 1] tensor would broadcast in the rotary embedding and give every sequence one
    position; float positions would be rounded), and, on the CPU (a GPU check would synchronize),
    every real token (slot >= 0) inside its context: context_lens[s] >= positions[s] + 1."""
    for name, value in (("positions", positions), ("slot_mapping", slot_mapping), ("context_lens", context_lens)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} is a {type(value).__name__}, expected an integer tensor of shape ({s},)")
        if value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}.dtype={value.dtype}, expected torch.int32 or torch.int64")
        if tuple(value.shape) != (s,):
            raise ValueError(f"{name}.shape={tuple(value.shape)}, expected ({s},) (one per sequence of hidden)")
    if positions.device.type != "cpu" or context_lens.device.type != "cpu" or slot_mapping.device.type != "cpu":
        return
    if s and int(positions.min()) < 0:
        raise ValueError(f"positions={positions.tolist()}, expected every entry >= 0")
    short = (slot_mapping >= 0) & (context_lens.long() < positions.long() + 1)
    if bool(short.any()):
        i = int(short.nonzero()[0, 0])
        raise ValueError(f"context_lens[{i}]={int(context_lens[i])} with positions[{i}]={int(positions[i])}, expected "
                         f">= {int(positions[i]) + 1} (the context includes the new token)")


class TQDecodeModel(nn.Module):
    """The decode step in the module docstring; forward returns (out, *updated caches).

    ``ops`` supplies ``cache_update`` and ``paged_attention`` with the reference's signatures:
    the reference by default; ``tq_deploy.dispatch`` runs the fast backends on GPU tensors.
    """

    def __init__(self, config: TQModelConfig = TQModelConfig(), ops=ReferenceOps):
        super().__init__()
        if config.num_layers != 1:
            raise ValueError(f"num_layers={config.num_layers}, expected 1 for TQDecodeModel "
                             "(decode_model() builds a TQDecodeStack for more)")
        self.ops = ops
        self.config = c = config
        g = torch.Generator().manual_seed(c.seed)
        qkv_out = (c.num_q_heads + 2 * c.num_kv_heads) * c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(c.num_q_heads * c.head_dim, c.hidden_size, bias=False)
        with torch.no_grad():
            self.qkv_proj.weight.copy_(torch.randn(qkv_out, c.hidden_size, generator=g) / math.sqrt(c.hidden_size))
            self.o_proj.weight.copy_(
                torch.randn(c.hidden_size, c.num_q_heads * c.head_dim, generator=g) / math.sqrt(c.num_q_heads * c.head_dim)
            )
        self.register_buffer("rotation", make_rotation(c.head_dim, c.rotation, c.seed))
        self.register_buffer("k_codebook", lloyd_max_codebook(c.head_dim, c.k_bits))
        self.register_buffer("v_codebook", lloyd_max_codebook(c.head_dim, c.v_bits))

    def project_qkv(self, hidden: torch.Tensor, positions: torch.Tensor):
        c = self.config
        s = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        # queries and keys take the rotary embedding together (one set of nodes in the exported graph)
        qk, v = qkv.split([(c.num_q_heads + c.num_kv_heads) * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        qk = rope(qk.reshape(s, c.num_q_heads + c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        q, k = qk.split([c.num_q_heads, c.num_kv_heads], 1)
        return q, k, v.reshape(s, c.num_kv_heads, c.head_dim)

    def forward(self, hidden, positions, slot_mapping, block_tables, context_lens, k_codes, k_norms, v_codes, v_norms):
        c = self.config
        if hidden.dim() != 2 or hidden.shape[-1] != c.hidden_size:
            raise ValueError(f"hidden.shape={tuple(hidden.shape)}, expected (S, {c.hidden_size})")
        if hidden.dtype != self.qkv_proj.weight.dtype:
            raise ValueError(f"hidden.dtype={hidden.dtype}, expected the model's dtype {self.qkv_proj.weight.dtype}")
        if not torch.compiler.is_compiling():  # torch.export traces this; the checks are for callers
            check_step_inputs(hidden.shape[0], positions, slot_mapping, context_lens)
        q, k, v = self.project_qkv(hidden, positions)
        caches = self.ops.cache_update(k, v, slot_mapping, k_codes, k_norms, v_codes, v_norms,
                                       self.rotation, self.k_codebook, self.v_codebook, c.k_bits, c.v_bits)
        attn = self.ops.paged_attention(q, *caches, block_tables, context_lens,
                                        self.rotation, self.k_codebook, self.v_codebook, c.k_bits, c.v_bits)
        out = self.o_proj(attn.reshape(hidden.shape[0], c.num_q_heads * c.head_dim).to(hidden.dtype))
        return (out, *caches)


class TQDecodeStack(nn.Module):
    """``num_layers`` decode blocks in sequence: layer l's output is layer l+1's hidden state.

    Layer l is ``block(config.layer_config(l))``: its own weights and rotation (seed + l), its own
    key/value widths (a bit plan) and its own paged cache; all layers share positions, slots,
    block tables and context lengths. forward(hidden, positions, slot_mapping, block_tables,
    context_lens, *caches) takes the four cache tensors of every layer in order and returns
    (out, *updated caches).
    """

    def __init__(self, config: TQModelConfig, ops=ReferenceOps, block=None):
        super().__init__()
        self.config = config
        block = block or TQDecodeModel
        self.layers = nn.ModuleList(block(config.layer_config(i), ops) for i in range(config.num_layers))

    def forward(self, hidden, positions, slot_mapping, block_tables, context_lens, *caches):
        if len(caches) != 4 * len(self.layers):
            raise ValueError(f"{len(caches)} cache tensors, expected 4 per layer ({4 * len(self.layers)})")
        updated = []
        for i, layer in enumerate(self.layers):
            hidden, *layer_caches = layer(hidden, positions, slot_mapping, block_tables, context_lens,
                                          *caches[4 * i:4 * i + 4])
            updated.extend(layer_caches)
        return (hidden, *updated)


def decode_model(config: TQModelConfig, ops=ReferenceOps) -> nn.Module:
    """The reference decode step of ``config``: TQDecodeModel for one layer, TQDecodeStack for more."""
    return TQDecodeModel(config, ops) if config.num_layers == 1 else TQDecodeStack(config, ops)


def example_inputs(config: TQModelConfig, context_lens: list[int], seed: int = 0, device=None) -> dict:
    """Inputs for one decode step of ``len(context_lens)`` sequences.

    Sequence s already holds ``context_lens[s] - 1`` tokens (random keys and
    values encoded into the cache); the step adds its last token. Blocks are
    handed out in a random order, and unused block-table entries are 0.
    In a stack every layer's cache holds the same random vectors, encoded with that
    layer's rotation and widths, under the cache names of model_input_names.
    """
    if config.num_layers > 1:
        layers = [example_inputs(config.layer_config(i), context_lens, seed, device) for i in range(config.num_layers)]
        inputs = {name: layers[0][name] for name in MODEL_INPUT_NAMES[:5]}
        for i, layer in enumerate(layers):
            inputs.update({f"{name}.{i}": layer[name] for name in MODEL_INPUT_NAMES[5:]})
        return inputs
    c = config
    g = torch.Generator().manual_seed(seed)
    if any(ctx < 1 for ctx in context_lens):
        raise ValueError(f"context_lens={context_lens}, expected every entry >= 1 (the new token counts)")
    blocks_needed = [-(-ctx // c.block_size) for ctx in context_lens]
    if max(blocks_needed) > c.max_blocks_per_seq:
        raise ValueError(f"context_lens max {max(context_lens)}, expected <= max_blocks_per_seq*block_size = "
                         f"{c.max_blocks_per_seq * c.block_size}")
    if sum(blocks_needed) > c.num_blocks:
        raise ValueError(f"context_lens need {sum(blocks_needed)} blocks, expected <= num_blocks={c.num_blocks}")
    order = torch.randperm(c.num_blocks, generator=g)
    s = len(context_lens)
    block_tables = torch.zeros(s, c.max_blocks_per_seq, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_needed):
        block_tables[i, :n] = order[start : start + n].int()
        start += n

    def slot(seq: int, t: int) -> int:
        return int(block_tables[seq, t // c.block_size]) * c.block_size + t % c.block_size

    prior = [slot(i, t) for i, ctx in enumerate(context_lens) for t in range(ctx - 1)]
    cache = allocate_cache(c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim, c.k_bits, c.v_bits)
    rotation = make_rotation(c.head_dim, c.rotation, c.seed)
    if prior:
        shape = (len(prior), c.num_kv_heads, c.head_dim)
        cache_update_reference(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                               torch.tensor(prior, dtype=torch.int64), *cache.tensors(), rotation,
                               lloyd_max_codebook(c.head_dim, c.k_bits), lloyd_max_codebook(c.head_dim, c.v_bits),
                               c.k_bits, c.v_bits)
    inputs = {
        "hidden": torch.randn(s, c.hidden_size, generator=g),
        "positions": torch.tensor([ctx - 1 for ctx in context_lens], dtype=torch.int64),
        "slot_mapping": torch.tensor([slot(i, ctx - 1) for i, ctx in enumerate(context_lens)], dtype=torch.int64),
        "block_tables": block_tables,
        "context_lens": torch.tensor(context_lens, dtype=torch.int32),
        "k_codes": cache.k_codes,
        "k_norms": cache.k_norms,
        "v_codes": cache.v_codes,
        "v_norms": cache.v_norms,
    }
    return {name: t.to(device) for name, t in inputs.items()}


MODEL_INPUT_NAMES = ("hidden", "positions", "slot_mapping", "block_tables", "context_lens",
                     "k_codes", "k_norms", "v_codes", "v_norms")
MODEL_OUTPUT_NAMES = ("out", "k_codes_out", "k_norms_out", "v_codes_out", "v_norms_out")


def model_input_names(config: TQModelConfig) -> tuple[str, ...]:
    """Graph inputs of the decode step: MODEL_INPUT_NAMES for one layer; the caches of layer l of a
    stack are ``k_codes.l``, ``k_norms.l``, ``v_codes.l``, ``v_norms.l``."""
    if config.num_layers == 1:
        return MODEL_INPUT_NAMES
    return MODEL_INPUT_NAMES[:5] + tuple(f"{n}.{i}" for i in range(config.num_layers) for n in MODEL_INPUT_NAMES[5:])


def model_output_names(config: TQModelConfig) -> tuple[str, ...]:
    """Graph outputs: MODEL_OUTPUT_NAMES for one layer; ``k_codes_out.l`` ... for layer l of a stack."""
    if config.num_layers == 1:
        return MODEL_OUTPUT_NAMES
    return MODEL_OUTPUT_NAMES[:1] + tuple(f"{n}.{i}" for i in range(config.num_layers) for n in MODEL_OUTPUT_NAMES[1:])
