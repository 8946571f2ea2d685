"""Valid random inputs for an exported model, from its metadata alone.

Random bytes are not valid inputs for these models: block tables must point
inside the cache, context lengths must fit the table, slots must be distinct.
So inputs are built from the config stored in ``metadata_props``:

* a decode model gets :func:`tq_deploy.reference.model.example_inputs`
  (prior tokens encoded into random blocks, one new token per sequence);
* a single-op model gets inputs made with the reference encoder and the
  model's own rotation/codebook initializers (so codes have valid padding bits).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from tq_deploy import ops
from tq_deploy.export.common import read_metadata
from tq_deploy.reference.model import TQModelConfig, example_inputs
from tq_deploy.reference.paged import allocate_cache, cache_update_reference
from tq_deploy.reference.quantizer import encode_reference

DEFAULT_CONTEXT_LENS = (1, 7, 40)  # one token, a partial block, several blocks (block size 16)


def model_initializers(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def default_context_lens(config: TQModelConfig) -> list[int]:
    """A few context lengths that fit ``config``: 1, a partial block, and the longest that fits."""
    capacity = min(config.max_blocks_per_seq * config.block_size,
                   config.num_blocks * config.block_size // 3)
    lens = sorted({1, min(config.block_size // 2 + 1, capacity), max(1, capacity - config.block_size // 3)})
    return lens


def random_inputs(model: onnx.ModelProto, seed: int = 0, context_lens=None, num_tokens: int = 6,
                  leading_sizes=None) -> dict[str, torch.Tensor]:
    """Inputs by graph-input name (torch tensors) for a model exported by tq-deploy."""
    kind, config = read_metadata(model)
    if kind == "model":
        cfg = TQModelConfig.from_dict(config)
        lens = list(context_lens) if context_lens is not None else default_context_lens(cfg)
        return example_inputs(cfg, lens, seed=seed)
    if kind != "op":
        raise ValueError(f"model metadata kind={kind!r}, expected 'model' or 'op'")
    return _op_inputs(config, model_initializers(model), seed, context_lens, num_tokens, leading_sizes)


def _op_inputs(config: dict, inits: dict, seed: int, context_lens, num_tokens: int, leading_sizes) -> dict:
    g = torch.Generator().manual_seed(seed)
    op = config["op"]
    dim = config["head_dim"]
    dtype = torch.float16 if config["dtype"] == "float16" else torch.float32
    rotation = inits["rotation"]
    if op in ("TQEncode", "TQDecode"):
        leading = leading_sizes or [d if isinstance(d, int) else 5 + i for i, d in enumerate(config["leading_dims"])]
        x = torch.randn(*leading, dim, generator=g)
        if op == "TQEncode":
            return {"x": x.to(dtype)}
        codes, norms = encode_reference(x, rotation, inits["codebook"], config["bits"])
        return {"codes": codes, "norms": norms}

    k_bits, v_bits = config["k_bits"], config["v_bits"]
    block = config["block_size"]
    hkv = config["num_kv_heads"] or 2
    lens = list(context_lens) if context_lens is not None else [0, 1, block + 3, 2 * block]
    blocks_per_seq = [-(-n // block) for n in lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks the tables never use
    cache = allocate_cache(num_blocks, block, hkv, dim, k_bits, v_bits)
    # Every slot holds an encoded random vector, so stale slots are realistic too.
    slots_total = num_blocks * block
    fill = torch.arange(slots_total, dtype=torch.int64)
    kv_shape = (slots_total, hkv, dim)
    cache_update_reference(torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g), fill,
                           *cache.tensors(), rotation, inits["k_codebook"], inits["v_codebook"], k_bits, v_bits)
    caches = dict(zip(("k_codes", "k_norms", "v_codes", "v_norms"), cache.tensors()))
    if op == "TQCacheUpdate":
        slots = torch.randperm(slots_total, generator=g)[:num_tokens]
        slots[num_tokens // 2] = -1  # one padding token
        shape = (num_tokens, hkv, dim)
        return {"key": torch.randn(shape, generator=g).to(dtype), "value": torch.randn(shape, generator=g).to(dtype),
                "slot_mapping": slots, **caches}
    if op == "TQPagedAttention":
        hq = config["num_q_heads"] or 2 * hkv
        order = torch.randperm(num_blocks, generator=g)
        width = max(max(blocks_per_seq), 1) + 1  # one unused column: its entries must not be read
        tables = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # junk where unused
        start = 0
        for s, n in enumerate(blocks_per_seq):
            tables[s, :n] = order[start:start + n].int()
            start += n
        return {"query": torch.randn(len(lens), hq, dim, generator=g).to(dtype), **caches, "block_tables": tables,
                "context_lens": torch.tensor(lens, dtype=torch.int32)}
    raise ValueError(f"op={op!r}, expected one of {sorted(ops.OPS_BY_NAME)}")


def as_numpy(inputs: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
