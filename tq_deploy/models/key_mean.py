"""The key mean of a deployed model (DecoderConfig.key_mean, ops.py): one mean key per layer and KV
head, before RoPE, measured once on calibration tokens.

The calibration needs no text: by default the model writes its own (``generated``: GENERATED_TEXTS
samples from its begin-of-sequence token, seed 0), which docs/quality.md measured to score like a
held-out text. A shipped text name or a text file can stand in (its first CALIBRATION_TOKENS tokens).
"""

from __future__ import annotations

import torch

CALIBRATION_TOKENS = 1024
GENERATED_TEXTS = 8  # the generated calibration: this many texts share the tokens


def calibration_tokens(decoder, source: str = "generated", *, first_token=None, tokenizer=None,
                       tokens: int = CALIBRATION_TOKENS) -> list[list[int]]:
    """Token-id lists to measure on: ``generated`` (the model's own samples from ``first_token``, its
    begin-of-sequence id; 0 when it has none), or a shipped text name or text file (``tokenizer``
    needed) cut to its first ``tokens`` tokens."""
    if source == "generated":
        from tq_deploy.models.kv_transform import generated_texts

        return generated_texts(decoder, GENERATED_TEXTS, max(2, tokens // GENERATED_TEXTS),
                               first_token if isinstance(first_token, int) else 0)
    from tq_deploy.models.texts import read_text, resolve_texts, tokenize

    if tokenizer is None:
        raise ValueError(f"--key-mean={source!r} is a text, which needs the model's tokenizer")
    [(_, path)] = resolve_texts([source])
    return [tokenize(tokenizer, read_text(path), tokens)[0].tolist()]


@torch.no_grad()
def measure_key_mean(decoder, texts: list[list[int]]) -> list[torch.Tensor]:
    """Per layer the mean [Hkv, D] (float32) of the keys before RoPE (k_proj's output) over every token of
    ``texts``, each text run as one sequence through a float-cache copy of ``decoder``'s weights
    (kv_transform.float_cache_copy: ``decoder`` itself when it is one)."""
    from tq_deploy.models.kv_transform import float_cache_copy
    from tq_deploy.reference.llama import allocate_caches, step_inputs

    plain = float_cache_copy(decoder)
    config = plain.config
    sums = [torch.zeros(config.num_kv_heads, config.head_dim, dtype=torch.float64) for _ in plain.layers]
    count = 0

    def recorder(layer):
        def hook(_module, _inputs, output):
            sums[layer].add_(output.double().reshape(-1, config.num_kv_heads, config.head_dim).sum(0))
        return hook

    handles = [layer.self_attn.k_proj.register_forward_hook(recorder(i)) for i, layer in enumerate(plain.layers)]
    try:
        for text in texts:
            blocks = -(-len(text) // config.block_size)
            tables = torch.arange(blocks, dtype=torch.int32)[None]
            inputs = step_inputs([text], [0], tables, config.block_size)
            plain(*inputs.values(), *allocate_caches(config, blocks))
            count += len(text)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("no calibration tokens, expected at least one text of >= 1 token")
    return [(s / count).float() for s in sums]


def set_key_mean(decoder, means: list[torch.Tensor]) -> None:
    """Copy per-layer means [Hkv, D] into a decoder built with ``key_mean=True``."""
    if not decoder.config.key_mean:
        raise ValueError("the decoder has no key mean (DecoderConfig.key_mean=False), expected one built with it")
    if len(means) != len(decoder.layers):
        raise ValueError(f"{len(means)} key means, expected one per layer ({len(decoder.layers)})")
    with torch.no_grad():
        for layer, mean in zip(decoder.layers, means):
            layer.self_attn.key_mean.copy_(mean)
