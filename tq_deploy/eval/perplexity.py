"""Perplexity of a causal LM whose KV cache holds quantized keys and values.

The tokens go through the model causally in chunks of ``chunk_size`` with a
``QuantizedKVCache`` (cache.py): each chunk's keys/values are quantized as the
attention layers append them, and the chunk attends to the quantized cache
(earlier chunks and its own). Then

    PPL = exp( -1/(T-1) * sum_{t=1}^{T-1} log p(x_t | x_<t) )

over the T tokens of ``input_ids``. TurboQuant and the naive quantizer are
per-vector, so the result does not depend on ``chunk_size``; the mixed
configuration picks its outlier channels, and the ``-ck`` configurations their
mean key, from the first chunk (the "prompt"), so for them the chunk size is
the calibration length.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tq_deploy.eval.cache import QuantizedKVCache
from tq_deploy.eval.configs import CacheConfig, parse_config
from tq_deploy.eval.kv_quantizers import KVQuantizer, LayerPlanKVQuantizer, build_kv_quantizer
from tq_deploy.presets import NORM_BITS_OF, BitPlan

DEFAULT_CHUNK_SIZE = 256


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    num_predicted: int
    seconds: float
    key_relative_mse: float
    value_relative_mse: float
    logits: torch.Tensor | None = field(default=None, repr=False)  # [T, vocab] when asked for


def _cache_keyword(model) -> str:
    """transformers >= 5.24 names the cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, quantizer: KVQuantizer | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE, return_logits: bool = False) -> PerplexityResult:
    """Perplexity of ``input_ids`` [1, T] with every cached key/value replaced by ``quantizer``'s x_hat.

    ``quantizer=None`` is the identity (the fp32 cache baseline, same code path).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, expected [1, T] with T >= 2")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}, expected >= 1")
    quantizer = quantizer if quantizer is not None else KVQuantizer()
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    total = ids.shape[1]
    cache = QuantizedKVCache(quantizer)
    cache_kw = {_cache_keyword(model): cache}
    nll = torch.zeros((), dtype=torch.float64)
    kept = []
    start_time = time.perf_counter()
    for start in range(0, total, chunk_size):
        chunk = ids[:, start:start + chunk_size]
        logits = model(input_ids=chunk, use_cache=True, **cache_kw).logits[0].float()
        targets = ids[0, start + 1:start + chunk_size + 1]  # the last chunk has one target fewer
        nll += F.cross_entropy(logits[: targets.shape[0]], targets, reduction="sum").double().cpu()
        if return_logits:
            kept.append(logits.cpu())
    seconds = time.perf_counter() - start_time
    expected = {layer: total for layer in range(len(cache.layers))}
    if not cache.quantized_tokens or cache.quantized_tokens != expected:
        raise RuntimeError(f"the cache quantized {cache.quantized_tokens} tokens per layer, expected {total} in each")
    count = total - 1
    return PerplexityResult(
        ppl=math.exp(float(nll) / count),
        nll_sum=float(nll),
        num_predicted=count,
        seconds=seconds,
        key_relative_mse=cache.relative_mse("keys"),
        value_relative_mse=cache.relative_mse("values"),
        logits=torch.cat(kept) if return_logits else None,
    )


def _plan_row(plan: BitPlan, loaded) -> dict:
    if plan.head_dim != loaded.head_dim or plan.num_layers != loaded.num_layers:
        raise ValueError(f"plan for head_dim {plan.head_dim}, {plan.num_layers} layers; expected the model's "
                         f"head_dim {loaded.head_dim} and {loaded.num_layers} layers")
    norm_bits = NORM_BITS_OF[plan.norm_dtype]
    per_head = [(8 * -(-loaded.head_dim * k // 8) + norm_bits + 8 * -(-loaded.head_dim * v // 8) + norm_bits) / 8
                for k, v in plan.layers]
    return {
        "config": plan.info.get("name", "plan"),
        "method": "plan",
        "rotation": "haar",
        "k_bits": sum(k for k, _ in plan.layers) / plan.num_layers,
        "v_bits": sum(v for _, v in plan.layers) / plan.num_layers,
        "center_keys": False,
        "half_norms": plan.norm_dtype == "float16",
        "effective_bits": plan.effective_bits(loaded.head_dim),
        "kv_bytes_per_token": int(round(loaded.num_kv_heads * sum(per_head))),
    }


def _config_row(config: CacheConfig, loaded) -> dict:
    return {
        "config": config.name,
        "method": config.method,
        "rotation": config.rotation if config.method in ("mse", "prod", "mixed") else None,
        "k_bits": config.k_bits,
        "v_bits": config.v_bits,
        "center_keys": config.center_keys,
        "half_norms": config.half_norms,
        "transform": config.transform,
        "calibration": config.calibration,
        "effective_bits": config.effective_bits(loaded.head_dim),
        "kv_bytes_per_token": config.bytes_per_token(loaded.head_dim, loaded.num_kv_heads, loaded.num_layers),
    }


def calibration_statistics(loaded, source: str, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """key_transforms.KVStatistics of CALIBRATION_TOKENS tokens of ``source`` (a shipped text name, a path, or
    ``generated``: the model's own samples), measured once per model and source."""
    from tq_deploy.eval.key_transforms import calibration_ids, collect_statistics

    memo = _STATISTICS.setdefault(loaded.model, {})
    if source not in memo:
        memo[source] = collect_statistics(loaded, calibration_ids(loaded, source), source, chunk_size)
    return memo[source]


_STATISTICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {source: KVStatistics}


def plan_quantizer(plan: BitPlan, loaded, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   name: str = "plan") -> KVQuantizer:
    """The cache of ``plan``: its widths per layer (LayerPlanKVQuantizer, rotation seed + l), its norm dtype
    and, when the plan names one, its keys stored without the key mean calibrated on that source."""
    from tq_deploy.eval.key_transforms import with_key_mean

    statistics = calibration_statistics(loaded, plan.key_mean, chunk_size) if plan.key_mean else None
    norms = getattr(torch, plan.norm_dtype)
    return with_key_mean(LayerPlanKVQuantizer(plan.layers, loaded.head_dim, seed, name=name, norm_dtype=norms),
                         statistics)


ROUNDING_NOISE = 1e-7  # relative: the size of a float32 rounding (2**-24 = 6e-8)


@contextlib.contextmanager
def rounding_draw(model, draw: int):
    """``model`` with its input embedding weights multiplied by 1 + ROUNDING_NOISE * N(0, 1) (generator
    seed ``draw``) inside the block, restored exactly after; draw 0 leaves the model as it is.

    The fp32 model's perplexity moves by about 1e-6 relative; a quantized cache carries such a change
    on (a coordinate on a code boundary takes the neighbouring code, and every later layer and token
    sees it), by 0.1-0.5 % on SmolLM2. A method that draws nothing (KIVI, naive, int8) gets its spread
    from such draws, as TurboQuant gets its from the rotation seed."""
    if draw == 0:
        yield model
        return
    weight = model.get_input_embeddings().weight
    kept = weight.detach().clone()
    noise = torch.randn(kept.shape, generator=torch.Generator().manual_seed(draw), dtype=torch.float32)
    try:
        with torch.no_grad():
            weight.mul_((1 + ROUNDING_NOISE * noise).to(weight.device, weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def rotation_seeds(seed: int, seeds: int, num_layers: int) -> list[int]:
    """The rotation seeds of ``seeds`` runs: seed, seed + step, ..., step = max(2, num_layers), so that no two
    runs share a rotation (TurboQuant_mse rotates layer l with seed + l, the other methods keys with the seed
    and values with seed + 1; the exported model's layer l with seed + l)."""
    step = max(2, num_layers)
    return [seed + step * i for i in range(seeds)]


def evaluate(configs, loaded, input_ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, seed: int = 0,
             progress=None, seeds: int = 1, labels: dict | None = None,
             rounding_draws: bool = False, draw: int = 0) -> list[dict]:
    """One row per configuration (names, CacheConfig or presets.BitPlan), the fp32 baseline first and
    always included.

    ``loaded`` is a model.LoadedModel; ``progress(row)`` is called after each row; ``labels`` maps a
    configuration name to the label its row shows (e.g. a preset name).
    With ``seeds`` > 1 every quantized configuration runs with the rotation seeds of :func:`rotation_seeds`:
    ``ppl`` is then the mean over seeds, ``delta_pct_std`` the sample standard deviation of the deltas
    and ``ppl_by_seed`` the individual values (fp32, naive, KIVI and int8 have no seed).
    ``rounding_draws``: the configurations that draw nothing but fp32 (naive, KIVI, int8) run ``seeds``
    times as well, draw i under :func:`rounding_draw` (i), so that every quantized row is a mean
    over draws; the fp32 baseline stays the one unperturbed run. ``draw`` > 0 (not with ``rounding_draws``)
    runs every row, the baseline included, under :func:`rounding_draw` (``draw``).
    """
    if draw and rounding_draws:
        raise ValueError(f"draw={draw} with rounding_draws=True, expected one or the other")
    if seeds < 1:
        raise ValueError(f"seeds={seeds}, expected >= 1")
    parsed = [c if isinstance(c, (CacheConfig, BitPlan)) else parse_config(c) for c in configs]
    parsed = [CacheConfig("fp32")] + [c for c in parsed if isinstance(c, BitPlan) or c.method != "fp32"]
    labels = labels or {}
    rows, baseline = [], None
    for config in parsed:
        runs = []
        if isinstance(config, BitPlan):
            row = _plan_row(config, loaded)
            random_draw = True
        else:
            row = _config_row(config, loaded)
            # fp32, naive and KIVI involve no random draw, nor does int8 with int8 values.
            random_draw = config.method in ("mse", "prod", "mixed") or (config.method == "int8" and config.v_bits != 8)
        run_seeds = rotation_seeds(seed, seeds, loaded.num_layers)
        rounding = rounding_draws and not random_draw and not (isinstance(config, CacheConfig)
                                                               and config.method == "fp32")
        for i in range(seeds if random_draw or rounding else 1):
            if isinstance(config, BitPlan):
                quantizer = plan_quantizer(config, loaded, run_seeds[i], chunk_size, row["config"])
            else:
                statistics = calibration_statistics(loaded, config.calibration, chunk_size) \
                    if config.transform else None
                quantizer = build_kv_quantizer(config, loaded.head_dim, run_seeds[i], statistics)
            with rounding_draw(loaded.model, i if rounding else draw):
                runs.append(perplexity(loaded.model, input_ids, quantizer, chunk_size))
        baseline = runs[0].ppl if baseline is None else baseline
        deltas = [100.0 * (r.ppl / baseline - 1.0) for r in runs]
        row["config"] = labels.get(row["config"], row["config"])
        row.update({
            "ppl": sum(r.ppl for r in runs) / len(runs),
            "delta_pct": sum(deltas) / len(deltas),
            "delta_pct_std": float(torch.tensor(deltas).std()) if len(deltas) > 1 else 0.0,
            "ppl_by_seed": [r.ppl for r in runs],
            "key_relative_mse": sum(r.key_relative_mse for r in runs) / len(runs),
            "value_relative_mse": sum(r.value_relative_mse for r in runs) / len(runs),
            "seconds": sum(r.seconds for r in runs),
        })
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows
