"""Per-layer key/value sensitivity and a per-layer bit plan for a PPL or memory budget.

1. **Probe.** For every layer l and side s (keys, values), quantize only that side of
   that layer with TurboQuant_mse at the probe width b0 (everything else stays fp32) and
   measure how far the model's next-token distributions move: the mean over the text's
   tokens of KL(p_fp32 || p_probe), KL(l, s, b0). (The change of the NLL itself is far
   noisier: one layer at 4 bits moves it by about 1e-3 nats per token, in either
   direction; the KL is never negative and is the expected NLL increase.)
2. **Model.** To second order the KL grows with the error energy that reaches the
   cache, and TurboQuant's error energy at b bits is the codebook's relative MSE m(b)
   (the same for every vector: the rotation makes it data-independent). So
   KL(l, s, b) ~= KL(l, s, b0) * m(b) / m(b0), and the layers add up:
   predicted PPL delta = exp(sum over layers and sides of KL) - 1. The default probes
   (keys 3 bits, values 2 bits) sit below the widths a plan uses, so the extrapolation
   runs towards smaller errors, where the quadratic model holds best.
3. **Allocate.** Start every side of every layer at ``min_bits`` and repeatedly give one
   more bit to the side whose predicted dNLL drops most (m(b) falls about 4x per bit,
   so the gains shrink and this greedy order is optimal for a separable convex cost),
   until the plan's mean effective bits reach the memory budget, or until the predicted
   PPL delta is within the PPL budget (the smallest plan found that meets it).
4. **Check.** The plan's real PPL on the calibration text is measured and stored with it.

The measured PPL of the plan (step 4) is the check on this model; docs/quality.md
compares predictions with measurements.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tq_deploy.eval.kv_quantizers import LayerPlanKVQuantizer
from tq_deploy.eval.perplexity import DEFAULT_CHUNK_SIZE, perplexity
from tq_deploy.presets import SUPPORTED_BITS, BitPlan, effective_bits
from tq_deploy.reference.codebook import expected_mse

SIDES = ("k", "v")
UNQUANTIZED = 32


@dataclass
class Sensitivity:
    """KL per token of quantizing one side of one layer at ``probe_bits`` (others fp32)."""

    baseline_nll: float  # mean NLL per predicted token, fp32 cache
    probe_bits: dict  # side -> probe width
    kl: dict  # (layer, side) -> mean KL(p_fp32 || p_probe) per token at the probe width
    head_dim: int
    num_layers: int
    seconds: float
    dnll: dict | None = None  # (layer, side) -> measured NLL change per token (for the record)

    def predicted_dnll(self, layer: int, side: str, bits: int) -> float:
        """Predicted NLL increase per token of ``side`` of ``layer`` at ``bits`` (the KL model)."""
        b0 = self.probe_bits[side]
        measured = max(self.kl[(layer, side)], 0.0)
        return measured * expected_mse(self.head_dim, bits) / expected_mse(self.head_dim, b0)

    def predicted_delta_pct(self, layers) -> float:
        """Predicted PPL delta (%) of per-layer widths ``layers[l] = (k_bits, v_bits)``."""
        total = sum(self.predicted_dnll(layer, side, bits)
                    for layer, pair in enumerate(layers) for side, bits in zip(SIDES, pair))
        return 100.0 * math.expm1(total)

    def to_dict(self) -> dict:
        dnll = self.dnll or {}
        return {"baseline_nll": self.baseline_nll, "probe_bits": self.probe_bits,
                "per_layer": [{"layer": layer, "kl_k": self.kl[(layer, "k")], "kl_v": self.kl[(layer, "v")],
                               "dnll_k": dnll.get((layer, "k")), "dnll_v": dnll.get((layer, "v"))}
                              for layer in range(self.num_layers)]}


def mean_kl(base_logits, logits) -> float:
    """Mean over positions of KL(softmax(base) || softmax(logits)), both [T, vocab]."""
    import torch

    logp_base = torch.log_softmax(base_logits.double(), -1)
    logp = torch.log_softmax(logits.double(), -1)
    return float((logp_base.exp() * (logp_base - logp)).sum(-1).mean())


def sequences_of(input_ids) -> list:
    """``input_ids`` as a list of [1, T] tensors: one tensor, or a list of them (generated texts)."""
    return list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]


def measure_sensitivity(loaded, input_ids, probe_k_bits: int = 3, probe_v_bits: int = 2,
                        chunk_size: int = DEFAULT_CHUNK_SIZE, seed: int = 0, progress=None,
                        key_mean=None) -> Sensitivity:
    """Step 1: one fp32 run and 2 * num_layers probe runs on ``input_ids``: one [1, T] tensor or a list
    of them (each its own sequence; KL and NLL are means over all their predicted tokens). ``key_mean``:
    the key_transforms.KVStatistics whose key mean the plan's cache stores its keys without (the key
    probes then quantize the keys as that cache does), or None."""
    from tq_deploy.eval.key_transforms import with_key_mean

    for name, bits in (("probe_k_bits", probe_k_bits), ("probe_v_bits", probe_v_bits)):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}={bits!r}, expected one of {SUPPORTED_BITS}")
    start = time.perf_counter()
    sequences = sequences_of(input_ids)
    bases = [perplexity(loaded.model, ids, None, chunk_size, return_logits=True) for ids in sequences]
    count = sum(b.num_predicted for b in bases)
    base_nll = sum(b.nll_sum for b in bases)
    kl, dnll = {}, {}
    for layer in range(loaded.num_layers):
        for side, bits in (("k", probe_k_bits), ("v", probe_v_bits)):
            plan = [(UNQUANTIZED, UNQUANTIZED)] * loaded.num_layers
            plan[layer] = (bits, UNQUANTIZED) if side == "k" else (UNQUANTIZED, bits)
            kl_sum, nll = 0.0, 0.0
            for ids, base in zip(sequences, bases):
                # a fresh quantizer per sequence: the key mean counts positions from each one's start
                probe = with_key_mean(LayerPlanKVQuantizer(plan, loaded.head_dim, seed), key_mean)
                result = perplexity(loaded.model, ids, probe, chunk_size, return_logits=True)
                n = base.num_predicted
                kl_sum += n * mean_kl(base.logits[:n], result.logits[:n])
                nll += result.nll_sum
            kl[(layer, side)] = kl_sum / count
            dnll[(layer, side)] = (nll - base_nll) / count
            if progress is not None:
                progress(layer, side, kl[(layer, side)], dnll[(layer, side)])
    return Sensitivity(base_nll / count, {"k": probe_k_bits, "v": probe_v_bits}, kl, loaded.head_dim,
                       loaded.num_layers, time.perf_counter() - start, dnll)


def allocate(sensitivity: Sensitivity, *, max_effective_bits: float | None = None,
             max_delta_pct: float | None = None, min_bits: int = 2, max_bits: int = 8,
             head_dim: int | None = None, norm_dtype: str = "float32") -> list[tuple[int, int]]:
    """Step 3: per-layer (k_bits, v_bits) for a memory budget (mean effective bits at ``head_dim``,
    default the model's, with norms of ``norm_dtype``) or a PPL budget (predicted delta in %); exactly
    one of the two."""
    if (max_effective_bits is None) == (max_delta_pct is None):
        raise ValueError("expected exactly one budget: max_effective_bits (memory) or max_delta_pct (PPL)")
    if min_bits not in SUPPORTED_BITS or max_bits not in SUPPORTED_BITS or min_bits > max_bits:
        raise ValueError(f"min_bits={min_bits!r}, max_bits={max_bits!r}, expected 1 <= min_bits <= max_bits <= 8")
    d = head_dim or sensitivity.head_dim
    n = sensitivity.num_layers
    bits = {(layer, side): min_bits for layer in range(n) for side in SIDES}

    def layers():
        return [(bits[(layer, "k")], bits[(layer, "v")]) for layer in range(n)]

    def mean_effective_bits():
        return sum(effective_bits(k, v, d, norm_dtype) for k, v in layers()) / n

    floor = effective_bits(min_bits, min_bits, d, norm_dtype)
    if max_effective_bits is not None and max_effective_bits < floor:
        raise ValueError(f"max_effective_bits={max_effective_bits:g}, expected >= {floor:g} "
                         f"(every layer at min_bits={min_bits} with head_dim {d})")
    step = 1.0 / (2 * n)  # one more bit on one side of one layer, in mean effective bits

    def done():
        if max_effective_bits is not None:
            return mean_effective_bits() + step > max_effective_bits + 1e-9
        return sensitivity.predicted_delta_pct(layers()) <= max_delta_pct

    while not done():
        best, gain = None, -1.0
        for key, b in bits.items():
            if b >= max_bits:
                continue
            g = sensitivity.predicted_dnll(*key, b) - sensitivity.predicted_dnll(*key, b + 1)
            if g > gain:
                best, gain = key, g
        if best is None:
            # Every side at max_bits and still over: a plan written anyway would claim a budget it misses.
            raise ValueError(f"PPL budget max_delta_pct={max_delta_pct:g}% cannot be met: every layer at "
                             f"max_bits={max_bits} predicts {sensitivity.predicted_delta_pct(layers()):+.4g}%, "
                             "expected a larger budget (or a larger max_bits)")
        bits[best] += 1
    return layers()


def make_plan(sensitivity: Sensitivity, layers, info: dict, key_mean: str | None = None,
              norm_dtype: str = "float32") -> BitPlan:
    return BitPlan(tuple(layers), sensitivity.head_dim, dict(info), key_mean, norm_dtype)
