"""Valid random inputs for an exported model, from its metadata alone.

Random bytes are not valid inputs for these models: block tables must point
inside the cache, context lengths must fit the table, slots must be distinct.
So inputs are built from the config stored in ``metadata_props``:

* a decode model gets :func:`tq_deploy.reference.model.example_inputs`
  (prior tokens encoded into random blocks, one new token per sequence);
* a single-op model gets the inputs its op's ``make_inputs`` entry draws
  (:mod:`tq_deploy.ops`), made with the reference encoder and the model's own
  rotation/codebook initializers (so codes have valid padding bits).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from tq_deploy import ops
from tq_deploy.export.loaded import ExportedModel
from tq_deploy.reference.model import TQModelConfig, example_inputs
from tq_deploy.reference.paged import allocate_cache, cache_update_reference
from tq_deploy.reference.quantizer import encode_reference

DEFAULT_CONTEXT_LENS = (1, 7, 40)  # one token, a partial block, several blocks (block size 16)
CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")


def model_initializers(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def default_context_lens(config: TQModelConfig) -> list[int]:
    """A few context lengths that fit ``config``: 1, a partial block, and the longest that fits."""
    capacity = min(config.max_blocks_per_seq * config.block_size,
                   config.num_blocks * config.block_size // 3)
    lens = sorted({1, min(config.block_size // 2 + 1, capacity), max(1, capacity - config.block_size // 3)})
    return lens


def random_inputs(model: ExportedModel | onnx.ModelProto, seed: int = 0, context_lens=None, num_tokens: int = 6,
                  leading_sizes=None) -> dict[str, torch.Tensor]:
    """Inputs by graph-input name (torch tensors) for a model exported by tq-deploy."""
    model = ExportedModel.of(model)
    kind, config = model.kind, model.metadata
    if kind == "model":
        cfg = model.config
        lens = list(context_lens) if context_lens is not None else default_context_lens(cfg)
        return example_inputs(cfg, lens, seed=seed)
    if kind == "llm":
        from tq_deploy.validate.llm import llm_inputs

        return llm_inputs(model, seed=seed)
    if kind != "op":
        raise ValueError(f"model metadata kind={kind!r}, expected 'model', 'llm' or 'op'")
    if config.get("op") not in ops.OPS_BY_NAME:
        raise ValueError(f"op={config.get('op')!r} in the model's metadata, expected one of {sorted(ops.OPS_BY_NAME)}")
    make = ops.OPS_BY_NAME[config["op"]].entry("make_inputs")
    return make(config, model_initializers(model.proto), torch.Generator().manual_seed(seed), context_lens=context_lens,
                num_tokens=num_tokens, leading_sizes=leading_sizes)


def _dtype(config: dict) -> torch.dtype:
    return torch.float16 if config["dtype"] == "float16" else torch.float32


def _vectors(config: dict, gen, leading_sizes) -> torch.Tensor:
    leading = leading_sizes or [d if isinstance(d, int) else 5 + i for i, d in enumerate(config["leading_dims"])]
    return torch.randn(*leading, config["head_dim"], generator=gen)


def encode_inputs(config: dict, inits: dict, gen, *, leading_sizes=None, **_) -> dict:
    return {"x": _vectors(config, gen, leading_sizes).to(_dtype(config))}


def decode_inputs(config: dict, inits: dict, gen, *, leading_sizes=None, **_) -> dict:
    codes, norms = encode_reference(_vectors(config, gen, leading_sizes), inits["rotation"], inits["codebook"],
                                    config["bits"])
    return {"codes": codes, "norms": norms}


def _filled_cache(config: dict, inits: dict, gen, lens: list[int]):
    """A cache with room for ``lens`` plus two spare blocks, every slot holding an encoded random
    vector (so stale slots are realistic too); returns (cache tensors by name, blocks per sequence)."""
    block, dim, hkv = config["block_size"], config["head_dim"], config["num_kv_heads"] or 2
    blocks_per_seq = [-(-n // block) for n in lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks the tables never use
    norm_dtype = torch.float16 if config.get("norm_dtype") == "float16" else torch.float32
    cache = allocate_cache(num_blocks, block, hkv, dim, config["k_bits"], config["v_bits"], norm_dtype=norm_dtype)
    slots_total = num_blocks * block
    kv_shape = (slots_total, hkv, dim)
    cache_update_reference(torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen),
                           torch.arange(slots_total, dtype=torch.int64), *cache.tensors(), inits["rotation"],
                           inits["k_codebook"], inits["v_codebook"], config["k_bits"], config["v_bits"])
    return dict(zip(CACHE_NAMES, cache.tensors())), blocks_per_seq


def cache_update_inputs(config: dict, inits: dict, gen, *, context_lens=None, num_tokens: int = 6, **_) -> dict:
    lens = list(context_lens) if context_lens is not None else [0, 1, config["block_size"] + 3, 2 * config["block_size"]]
    caches, _ = _filled_cache(config, inits, gen, lens)
    slots_total = caches["k_codes"].shape[0] * config["block_size"]
    slots = torch.randperm(slots_total, generator=gen)[:num_tokens]
    slots[num_tokens // 2] = -1  # one padding token
    shape = (num_tokens, caches["k_codes"].shape[2], config["head_dim"])
    dtype = _dtype(config)
    return {"key": torch.randn(shape, generator=gen).to(dtype), "value": torch.randn(shape, generator=gen).to(dtype),
            "slot_mapping": slots, **caches}


def _block_tables(caches: dict, blocks_per_seq: list[int], gen) -> torch.Tensor:
    """Each sequence's blocks, drawn without repeats in a random order; one unused column more than
    the longest sequence needs, its entries (and those past each sequence's blocks) junk that must not
    be read."""
    order = torch.randperm(caches["k_codes"].shape[0], generator=gen)
    width = max(max(blocks_per_seq, default=0), 1) + 1
    tables = torch.full((len(blocks_per_seq), width), 10**6, dtype=torch.int32)
    start = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = order[start:start + n].int()
        start += n
    return tables


def paged_attention_inputs(config: dict, inits: dict, gen, *, context_lens=None, **_) -> dict:
    lens = list(context_lens) if context_lens is not None else [0, 1, config["block_size"] + 3, 2 * config["block_size"]]
    caches, blocks_per_seq = _filled_cache(config, inits, gen, lens)
    hkv = caches["k_codes"].shape[2]
    hq = config["num_q_heads"] or 2 * hkv
    tables = _block_tables(caches, blocks_per_seq, gen)
    query = torch.randn(len(lens), hq, config["head_dim"], generator=gen).to(_dtype(config))
    return {"query": query, **caches, "block_tables": tables, "context_lens": torch.tensor(lens, dtype=torch.int32)}


def default_prefill_lens(block_size: int) -> tuple[list[int], list[int]]:
    """(context_lens, new tokens per sequence) with the odd cases of a prefill call: a context with no
    new token, a one-token prompt, a decode-like step, a chunk crossing a block boundary, and a chunk
    that is the whole context of several blocks."""
    b = block_size
    return [b + 5, 1, b // 2 + 1, b + 3, 2 * b], [0, 1, 1, 6, 2 * b]


def spoil_unused_slots(caches: dict, tables: torch.Tensor, lens: list[int], gen) -> None:
    """NaN norms and random code bytes in every slot no sequence's context covers (spare blocks and the
    tail of each last block): a kernel that reads them, even to mask them, shows NaN."""
    num_blocks, block = caches["k_codes"].shape[:2]
    used = torch.zeros(num_blocks * block, dtype=torch.bool)
    for s, n in enumerate(lens):
        t = torch.arange(n)
        used[tables[s, t // block].long() * block + t % block] = True
    unused = ~used.view(num_blocks, block)
    for name in ("k_norms", "v_norms"):
        caches[name][unused] = float("nan")
    for name in ("k_codes", "v_codes"):
        junk = torch.randint(0, 256, caches[name].shape, dtype=torch.uint8, generator=gen)
        caches[name][unused] = junk[unused]


def paged_prefill_inputs(config: dict, inits: dict, gen, *, context_lens=None, num_tokens: int = 6,
                         query_lens=None, **_) -> dict:
    """Prefill inputs: context_lens (default :func:`default_prefill_lens`) with query_lens new tokens per
    sequence (default min(num_tokens, context)); unused slots and table entries are junk."""
    if context_lens is None:
        lens, counts = default_prefill_lens(config["block_size"])
    else:
        lens = list(context_lens)
        counts = list(query_lens) if query_lens is not None else [min(num_tokens, n) for n in lens]
    if len(counts) != len(lens) or any(not 0 <= q <= n for q, n in zip(counts, lens)):
        raise ValueError(f"query_lens={counts}, expected one count per sequence in 0..context_lens={lens}")
    caches, blocks_per_seq = _filled_cache(config, inits, gen, lens)
    tables = _block_tables(caches, blocks_per_seq, gen)
    spoil_unused_slots(caches, tables, lens, gen)
    hkv = caches["k_codes"].shape[2]
    hq = config["num_q_heads"] or 2 * hkv
    query = torch.randn(sum(counts), hq, config["head_dim"], generator=gen).to(_dtype(config))
    starts = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {"query": query, **caches, "block_tables": tables, "context_lens": torch.tensor(lens, dtype=torch.int32),
            "query_start": starts}


def as_numpy(inputs: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
