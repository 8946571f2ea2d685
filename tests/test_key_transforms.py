"""Calibrated key/value transforms (tq_deploy/eval/key_transforms.py) on a tiny random Llama.

The model has attention biases, so its keys and values have a mean to remove. No model package
is needed; each test runs in well under a second after the fixture.
"""

from __future__ import annotations

import pytest
import torch

from tq_deploy.eval.configs import parse_config

transformers = pytest.importorskip("transformers", reason="needs the eval extra: pip install .[eval]")

from tq_deploy.eval.key_transforms import (  # noqa: E402
    DeployedKV,
    TransformedKV,
    collect_statistics,
    fold_into_weights,
    optimal_scale,
    parse_transform,
)
from tq_deploy.eval.kv_quantizers import KVQuantizer, LayerPlanKVQuantizer, build_kv_quantizer  # noqa: E402
from tq_deploy.eval.perplexity import _cache_keyword, perplexity  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS = 4, 2, 16, 2


@pytest.fixture(scope="module")
def tiny():
    from tq_deploy.eval.model import LoadedModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
                                   max_position_embeddings=256, attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            elif "proj" in name:  # attention biases: keys and values with a mean of their own
                p.copy_(torch.randn_like(p))
    return LoadedModel(model, None, "tiny-llama", LAYERS, HEADS, KV_HEADS, DIM)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def stats(tiny, ids):
    return collect_statistics(tiny, ids, "random", chunk_size=32)


def test_statistics_are_the_cached_keys_and_values_and_deterministic(tiny, ids, stats):
    cache = transformers.DynamicCache()
    pre_rope = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out, idx=idx: pre_rope.__setitem__(idx, out[0].reshape(-1, KV_HEADS, DIM)))
        for idx, layer in enumerate(tiny.model.model.layers)]
    with torch.no_grad():
        tiny.model(input_ids=ids, use_cache=True, **{_cache_keyword(tiny.model): cache})
    for hook in hooks:
        hook.remove()
    for layer in range(LAYERS):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [kv_heads, T, D], after RoPE
        torch.testing.assert_close(stats.key_mean[layer], keys.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.value_mean[layer], values.mean(1), atol=1e-5, rtol=1e-5)
        assert stats.key_mean[layer].norm() > 0.3 * keys.norm(dim=-1).mean()  # the bias gave them a mean
        # Before RoPE: the k_proj output itself, taken from a hook rather than by turning RoPE back.
        torch.testing.assert_close(stats.key_mean_pre[layer], pre_rope[layer].mean(0), atol=1e-5, rtol=1e-5)
    again = collect_statistics(tiny, ids, "random", chunk_size=32)
    for name in ("key_mean", "key_scale", "value_mean", "value_scale", "key_scale_raw", "value_scale_raw"):
        for a, b in zip(getattr(stats, name), getattr(again, name)):
            assert torch.equal(a, b), name


def test_key_scale_is_shared_by_each_rope_pair_and_commutes_with_rope(tiny, stats):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(1, KV_HEADS, 40, DIM, generator=torch.Generator().manual_seed(2))
    cos, sin = tiny.model.model.rotary_emb(x, torch.arange(40)[None])
    for layer in range(LAYERS):
        for scale in (stats.key_scale[layer], stats.key_scale_raw[layer]):
            torch.testing.assert_close(scale[:, :DIM // 2], scale[:, DIM // 2:], atol=0, rtol=0)
            s = scale[None, :, None, :]
            rotated_scaled, _ = apply_rotary_pos_emb(x * s, x, cos, sin)
            scaled_rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
            torch.testing.assert_close(rotated_scaled, scaled_rotated * s, atol=1e-5, rtol=1e-5)
    # A scale that differs inside a pair would not commute: the check above can fail.
    unpaired = torch.linspace(0.5, 2.0, DIM)
    a, _ = apply_rotary_pos_emb(x * unpaired, x, cos, sin)
    b, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert (a - b * unpaired).abs().max() > 1e-2


def test_optimal_scale_minimizes_the_score_error_bound():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(64, generator=gen) ** 3 + 1e-3, torch.rand(64, generator=gen) ** 3 + 1e-3

    def bound(s):
        return float((a * s**2).sum() * (b / s**2).sum())

    best = optimal_scale(a, b)
    assert abs(float(best.log().mean())) < 1e-5  # geometric mean 1
    assert bound(best) < 0.99 * bound(torch.ones(64))
    for _ in range(20):
        assert bound(best) <= bound(best * torch.exp(0.1 * torch.randn(64, generator=gen))) * (1 + 1e-6)


@pytest.mark.parametrize("kind", ["kc", "ks", "kcs", "vcs", "kvcs", "kpc", "kpcs0", "kpc0vcs0"])
def test_transform_around_the_identity_is_the_fp32_cache(tiny, ids, stats, kind):
    base = perplexity(tiny.model, ids, None, 32, return_logits=True)
    moved = perplexity(tiny.model, ids, TransformedKV(KVQuantizer(), stats, kind), 32, return_logits=True)
    torch.testing.assert_close(moved.logits, base.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["kc", "kcs", "kvcs"])
def test_folded_weights_and_one_subtraction_compute_the_same_model(tiny, ids, stats, kind):
    """The deployed form: scales in the projections, offsets subtracted before the cache, never added back
    to the keys. With the fp32 cache it is the original model; with TurboQuant it is the evaluation's
    TransformedKV (the same codes, the scores shifted by q.mu_k only)."""
    folded, key_offsets, value_offsets = fold_into_weights(tiny.model, stats, kind, HEADS, KV_HEADS, DIM)
    base = perplexity(tiny.model, ids, None, 32, return_logits=True)
    deployed = perplexity(folded, ids, DeployedKV(KVQuantizer(), key_offsets, value_offsets), 32, return_logits=True)
    torch.testing.assert_close(deployed.logits, base.logits, atol=2e-4, rtol=2e-4)
    # Without the offsets subtracted the stored keys are not centered: the check above sees the folding.
    assert max(float(o.abs().max()) for o in key_offsets) > 0.1

    turbo = LayerPlanKVQuantizer.uniform(4, 4, DIM, seed=5)
    evaluated = perplexity(tiny.model, ids, TransformedKV(turbo, stats, kind), 32, return_logits=True)
    deployed_q = perplexity(folded, ids, DeployedKV(turbo, key_offsets, value_offsets), 32, return_logits=True)
    torch.testing.assert_close(deployed_q.logits, evaluated.logits, atol=2e-3, rtol=2e-3)
    plain = perplexity(tiny.model, ids, turbo, 32, return_logits=True)
    assert (plain.logits - evaluated.logits).abs().max() > 1e-2  # the transform changed what was quantized


def test_centering_shrinks_the_score_error_of_keys_with_a_mean():
    """Keys with a large common mean: TurboQuant's error scales with ||k||, centering removes the mean's share,
    and the error of q.k (what attention sees) drops with it."""
    gen = torch.Generator().manual_seed(4)
    mu = 3.0 * torch.randn(DIM, generator=gen)
    keys = (mu + torch.randn(1, 1, 512, DIM, generator=gen)).float()
    q = torch.randn(64, DIM, generator=gen)
    from tq_deploy.eval.key_transforms import KVStatistics

    stats = KVStatistics("synthetic", 512, [keys[0].mean(1)], [torch.ones(1, DIM)], [torch.zeros(1, DIM)],
                         [torch.ones(1, DIM)], [torch.ones(1, DIM)], [torch.ones(1, DIM)])
    turbo = LayerPlanKVQuantizer.uniform(3, 3, DIM, seed=0)
    plain = turbo.quantize_keys(keys, 0)
    centered = TransformedKV(turbo, stats, "kc").quantize_keys(keys, 0)

    def score_error(k_hat):  # spread-free: the common shift q.(k_hat - k) averaged over keys does not count
        err = q @ (k_hat - keys)[0, 0].T
        return float((err - err.mean(1, keepdim=True)).pow(2).mean())

    assert score_error(centered) < 0.3 * score_error(plain)


def test_config_names_and_bad_names():
    config = parse_config("mse-k4v3-kcs@darwin")
    assert (config.k_bits, config.v_bits, config.transform, config.calibration) == (4, 3, "kcs", "darwin")
    assert config.name == "mse-k4v3-kcs@darwin" and parse_config(config.name) == config
    # The transform's vectors are per model: no stored bit changes.
    assert config.effective_bits(64) == parse_config("mse-k4v3").effective_bits(64) == 4.0
    assert parse_transform("kvcs") == (True, True, True, True)
    assert parse_transform("vc") == (False, False, True, False)
    with pytest.raises(ValueError, match="kernel work"):
        fold_into_weights(None, None, "kpc0", HEADS, KV_HEADS, DIM)
    for bad in ("mse-4-k@darwin", "mse-4-kv@darwin", "mse-4-k0@darwin", "mse-4-kp@darwin", "mse-4-kcs@",
                "kivi-4-kc@darwin", "mse-4-ck-kc@darwin", "mse-4-kss@darwin", "mse-4-kcsvcs@darwin"):
        with pytest.raises(ValueError) as err:
            parse_config(bad)
        assert "\n" not in str(err.value) and "expected" in str(err.value)
    with pytest.raises(ValueError, match="statistics"):
        build_kv_quantizer(config, 64)


def test_generated_calibration_is_the_exporters_seeded_samples(tiny):
    from tq_deploy.eval.key_transforms import GENERATED_TEXTS, calibration_ids

    ids = calibration_ids(tiny, "generated", 64)
    assert len(ids) == GENERATED_TEXTS and all(tuple(t.shape) == (1, 64 // GENERATED_TEXTS) for t in ids)
    again = calibration_ids(tiny, "generated", 64)
    assert all(torch.equal(a, b) for a, b in zip(ids, again))
    assert len({tuple(t[0].tolist()) for t in ids}) > 1  # sampled, not one greedy text eight times
    stats = collect_statistics(tiny, ids, "generated", chunk_size=32)
    assert stats.tokens == 64 and len(stats.key_mean) == LAYERS


def test_the_first_token_is_kept_only_where_asked(stats):
    """kpc0vc0: the first token of a sequence (the attention sink) is stored as it is, keys and values;
    later chunks of the same layer are quantized everywhere."""
    gen = torch.Generator().manual_seed(6)
    keys, values = torch.randn(2, 1, KV_HEADS, 8, DIM, generator=gen)
    for kind, key_kept, value_kept in (("kpc0vc0", True, True), ("kpc0", True, False), ("kpcvc0", False, True),
                                       ("kpc", False, False), ("kpc1", False, False)):
        quantizer = TransformedKV(LayerPlanKVQuantizer.uniform(2, 2, DIM, seed=0), stats, kind)
        first_k, first_v = quantizer.quantize_keys(keys, 0), quantizer.quantize_values(values, 0)
        assert torch.equal(first_k[..., 0, :], keys[..., 0, :]) == key_kept, kind
        assert torch.equal(first_v[..., 0, :], values[..., 0, :]) == value_kept, kind
        assert not torch.equal(first_k[..., 1, :], keys[..., 1, :])
        later_k, later_v = quantizer.quantize_keys(keys, 0), quantizer.quantize_values(values, 0)
        assert not torch.equal(later_k[..., 0, :], keys[..., 0, :])
        assert not torch.equal(later_v[..., 0, :], values[..., 0, :])


def test_kpc1_quantizes_the_first_key_without_the_mean(stats):
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(1, KV_HEADS, 8, DIM, generator=gen)
    turbo = LayerPlanKVQuantizer.uniform(3, 3, DIM, seed=0)
    first = TransformedKV(turbo, stats, "kpc1").quantize_keys(keys, 0)
    centered = TransformedKV(turbo, stats, "kpc").quantize_keys(keys, 0)
    torch.testing.assert_close(first[..., 0, :], turbo.quantize_keys(keys, 0)[..., 0, :])
    torch.testing.assert_close(first[..., 1:, :], centered[..., 1:, :])
    assert not torch.allclose(first[..., 0, :], centered[..., 0, :])


def test_the_kpc_score_term_is_q_dot_the_rotated_mean(tiny):
    """What attention adds back under kpc, the attention ops' per-pair form (the reference's
    key_mean_scores), equals q . RoPE_t(mu) with the model's own rotary embedding at t >= 1 (0 at
    t = 0, whose key keeps its mean); the stored key plus it gives the unquantized score."""
    from tq_deploy.eval.key_transforms import apply_rope, rope_callable
    from tq_deploy.reference.paged import key_mean_scores

    gen = torch.Generator().manual_seed(8)
    q, mu = torch.randn(5, DIM, generator=gen), torch.randn(DIM, generator=gen)
    keys_pre = torch.randn(40, DIM, generator=gen)
    positions = torch.arange(40)
    cos, sin = rope_callable(tiny.model)(positions)
    inv_freq = tiny.model.model.rotary_emb.inv_freq.float()

    def bias_at(pos):
        return key_mean_scores(q[:, None, None, :], mu[None], inv_freq, pos).reshape(5, len(pos))

    bias = bias_at(positions)
    torch.testing.assert_close(bias[:, 1:], (q @ apply_rope(mu.expand(40, DIM), cos, sin).T)[:, 1:], atol=1e-4,
                               rtol=1e-4)
    assert not bias[:, 0].any()
    stored = apply_rope(keys_pre - mu, cos, sin)  # k_t - R_t mu
    torch.testing.assert_close((q @ stored.T + bias)[:, 1:], (q @ apply_rope(keys_pre, cos, sin).T)[:, 1:],
                               atol=1e-4, rtol=1e-4)
    # The sign of B matters: turning the other way (B's sign flipped) gives another term.
    flipped = bias_at(-positions)
    assert (flipped - bias).abs().max() > 1e-2



def test_a_plan_with_the_key_mean_scores_as_its_configuration(tiny, ids, stats, monkeypatch):
    """evaluate(): a uniform BitPlan carrying a key mean is the mse-kKvV-kpc1@SOURCE row to rounding, and
    not the plan without it."""
    from tq_deploy.eval import perplexity as ppl_module
    from tq_deploy.presets import BitPlan

    monkeypatch.setitem(ppl_module._STATISTICS, tiny.model, {"random": stats})
    plans = [BitPlan(((4, 3),) * LAYERS, DIM, {"name": name}, key_mean=mean)
             for name, mean in (("with", "random"), ("without", None))]
    rows = ppl_module.evaluate(["mse-k4v3-kpc1@random", *plans], tiny, ids, chunk_size=32)
    by_name = {r["config"]: r["ppl"] for r in rows}
    assert by_name["with"] == pytest.approx(by_name["mse-k4v3-kpc1@random"], rel=1e-6)
    assert abs(by_name["without"] / by_name["with"] - 1) > 1e-4


def test_calibrate_probes_the_keys_without_the_key_mean(tiny, ids, stats):
    """measure_sensitivity(key_mean=...): a key probe is the NLL change of that layer's keys quantized as
    the kpc1 cache stores them; value probes do not depend on the key mean."""
    from tq_deploy.eval.calibrate import measure_sensitivity
    from tq_deploy.eval.key_transforms import with_key_mean

    plain = measure_sensitivity(tiny, ids, 2, 2, chunk_size=32)
    centred = measure_sensitivity(tiny, ids, 2, 2, chunk_size=32, key_mean=stats)
    base = perplexity(tiny.model, ids, None, 32)
    plan = [(32, 32)] * LAYERS
    plan[1] = (2, 32)
    probe = perplexity(tiny.model, ids, with_key_mean(LayerPlanKVQuantizer(plan, DIM), stats), 32)
    count = ids.shape[1] - 1
    assert centred.dnll[(1, "k")] == pytest.approx((probe.nll_sum - base.nll_sum) / count, abs=1e-6)
    assert any(abs(centred.kl[(layer, "k")] - plain.kl[(layer, "k")]) > 1e-3 * plain.kl[(layer, "k")]
               for layer in range(LAYERS))
    for layer in range(LAYERS):
        assert centred.kl[(layer, "v")] == pytest.approx(plain.kl[(layer, "v")], rel=1e-3, abs=1e-7)


def test_calibrate_on_several_sequences_weights_each_by_its_tokens(tiny, stats):
    """measure_sensitivity over a list of sequences (`calibrate --text generated`): each probe's KL and
    NLL change are the token-weighted means of those of the sequences alone."""
    from tq_deploy.eval.calibrate import measure_sensitivity

    gen = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, 97, (1, 40), generator=gen), torch.randint(0, 97, (1, 24), generator=gen)
    both = measure_sensitivity(tiny, [first, second], 2, 2, chunk_size=16, key_mean=stats)
    alone = [measure_sensitivity(tiny, ids, 2, 2, chunk_size=16, key_mean=stats) for ids in (first, second)]
    for key in both.kl:
        assert both.kl[key] == pytest.approx((39 * alone[0].kl[key] + 23 * alone[1].kl[key]) / 62, rel=1e-9)
        assert both.dnll[key] == pytest.approx((39 * alone[0].dnll[key] + 23 * alone[1].dnll[key]) / 62,
                                               rel=1e-9, abs=1e-12)
    assert both.baseline_nll == pytest.approx((39 * alone[0].baseline_nll + 23 * alone[1].baseline_nll) / 62)
