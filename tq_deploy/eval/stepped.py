"""Perplexity through a generation backend: the exported LLM in ONNX Runtime, or the reference decoder.

    result = stepped_perplexity(LLMSession("model.onnx", num_blocks=130), input_ids, chunk_size=256)

The same computation as :func:`tq_deploy.eval.perplexity.perplexity`, run the way the deployed
model runs: the T tokens go through the backend's paged cache in chunks of ``chunk_size``, each
chunk written to the cache and then attended to (causally within itself), and every row of the
chunk returns its logits (``logits_index`` = all rows). With the TurboQuant cache of the same
widths, rotations (seed + layer) and codebooks, it equals the PyTorch eval-ppl of that
configuration up to float32 rounding (LayerPlanKVQuantizer documents the convention).
"""

from __future__ import annotations

import math
import time

import numpy as np

from tq_deploy.eval.perplexity import DEFAULT_CHUNK_SIZE, PerplexityResult


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """sum_i -log softmax(logits[i])[targets[i]], in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float((log_norm - z[np.arange(len(targets)), targets]).sum())


def stepped_perplexity(backend, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       return_logits: bool = False) -> PerplexityResult:
    """Perplexity of ``input_ids`` ([T] or [1, T]) through ``backend`` (module docstring). The backend's
    cache must hold the T tokens (``num_blocks * block_size >= T``); its blocks 0.. are used in order."""
    from tq_deploy.runtime.generation import pack_step

    ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids, dtype=np.int64).reshape(-1)
    total = ids.shape[0]
    if total < 2:
        raise ValueError(f"input_ids has {total} tokens, expected >= 2 (perplexity needs a next token)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}, expected >= 1")
    b = backend.block_size
    if backend.num_blocks * b < total:
        raise ValueError(f"{total} tokens, expected at most the cache's {backend.num_blocks} blocks of {b} tokens")
    blocks = list(range(-(-total // b)))
    nll, kept = 0.0, []
    start_time = time.perf_counter()
    for start in range(0, total, chunk_size):
        chunk = ids[start:start + chunk_size]
        step = pack_step([(chunk, start, blocks[:-(-(start + len(chunk)) // b)])], b, logits_rows="all")
        logits = backend.step(step)
        targets = ids[start + 1:start + chunk_size + 1]  # the last chunk has one target fewer
        nll += log_softmax_nll(logits[:len(targets)], targets)
        if return_logits:
            kept.append(logits)
    seconds = time.perf_counter() - start_time
    count = total - 1
    logits = None
    if return_logits:
        import torch

        logits = torch.from_numpy(np.concatenate(kept))
    return PerplexityResult(ppl=math.exp(nll / count), nll_sum=nll, num_predicted=count, seconds=seconds,
                            key_relative_mse=float("nan"), value_relative_mse=float("nan"), logits=logits)
