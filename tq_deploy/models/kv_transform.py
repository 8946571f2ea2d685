"""What eval-ppl's calibrated key/value transforms (tq_deploy/eval/key_transforms.py) share with the
reference decoder: the per-channel scale rule, and calibration texts the model samples itself.

None of these transforms is part of an exported model: the ones that need no kernel change (a fixed
mean after RoPE, scales folded into the projections) did not lower SmolLM2's perplexity beyond the
seed spread or made it worse; docs/quality.md has the results.
"""

from __future__ import annotations

from dataclasses import replace

import torch


def pair_energy(x: torch.Tensor) -> torch.Tensor:
    """Energy of each RoPE pair (channels i and i + D/2, the rotate_half layout), on both its channels."""
    half = x.shape[-1] // 2
    pair = x[..., :half] + x[..., half:]
    return torch.cat([pair, pair], -1)


def optimal_scale(reader_energy: torch.Tensor, cached_energy: torch.Tensor) -> torch.Tensor:
    """Per channel s = (b / a)^(1/4), normalized to a geometric mean of 1 (TurboQuant is scale-free).

    The rotated error e of x / s has ||e|| ~ ||x / s||; it reaches the output through s times what
    reads the channel (the query for keys, W_o's columns for values): E[(s a . e)^2] ~ sum(a s^2) *
    sum(b / s^2), smallest (Cauchy-Schwarz) at s^2 = sqrt(b / a), a = the reader's energy, b = the
    cached coordinate's."""
    a = reader_energy.double().clamp_min(1e-30)
    b = cached_energy.double().clamp_min(1e-30)
    s = (b / a).pow(0.25)
    return (s / s.log().mean(-1, keepdim=True).exp()).float()


def float_cache_copy(decoder):
    """``decoder``'s weights in float32 behind an unquantized cache (the checkpoint's own computation), for
    calibration; ``decoder`` itself when it already is one."""
    from tq_deploy.reference.llama import LlamaDecoder

    if decoder.config.cache == "float32" and decoder.dtype == torch.float32:
        return decoder
    plain = LlamaDecoder(replace(decoder.config, cache="float32", key_mean=False)).eval()
    plain.load_weights({n: p.float() for n, p in decoder.named_parameters()})
    return plain


@torch.no_grad()
def generated_texts(decoder, sequences: int, length: int, first_token: int, seed: int = 0) -> list[list[int]]:
    """``sequences`` texts of ``length`` tokens that the model writes itself from ``first_token``, all
    sampled at once (temperature 1, ``seed``, float cache): calibration data that needs nothing
    beside the checkpoint."""
    from tq_deploy.reference.llama import allocate_caches, step_inputs

    if sequences < 1 or length < 2:
        raise ValueError(f"{sequences} calibration texts of {length} tokens, expected >= 1 of >= 2 tokens")
    plain = float_cache_copy(decoder)
    config = plain.config
    gen = torch.Generator().manual_seed(seed)
    per = -(-length // config.block_size)
    tables = torch.arange(sequences * per, dtype=torch.int32).reshape(sequences, per)
    caches = allocate_caches(config, sequences * per)
    texts = [[int(first_token)] for _ in range(sequences)]
    for done in range(length - 1):
        inputs = step_inputs([t[-1:] for t in texts], [done] * sequences, tables, config.block_size)
        logits, *caches = plain(*inputs.values(), *caches)
        picked = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=gen)[:, 0]
        for text, token in zip(texts, picked.tolist()):
            text.append(int(token))
    return texts
