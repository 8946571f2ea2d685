"""Configurations, storage accounting and the naive baseline of the perplexity evaluation (no model needed)."""

from __future__ import annotations

import pytest
import torch

from tq_deploy.eval.configs import DEFAULT_CONFIGS, CacheConfig, parse_config, with_bits
from tq_deploy.eval.naive import NaiveAbsmaxQuantizer


@pytest.mark.parametrize("name", DEFAULT_CONFIGS)
def test_default_names_round_trip(name):
    assert parse_config(name).name == name


def test_int8_names():
    assert parse_config("int8") == CacheConfig("int8", 8, 8)
    assert parse_config("int8-v4") == CacheConfig("int8", 8, 4)
    assert parse_config("int8-v4").side_method("v") == "mse" and parse_config("int8").side_method("v") == "int8"
    assert with_bits(parse_config("int8"), None, 3).name == "int8-v3"
    assert parse_config("kivi-k4v2") == CacheConfig("kivi", 4, 2)


def test_parse_fields():
    assert parse_config("mse-k4v3-hadamard") == CacheConfig("mse", 4, 3, "hadamard")
    assert parse_config("mixed-2.5") == CacheConfig("mixed", 2.5, 2.5, "haar")
    assert parse_config("prod-3") == CacheConfig("prod", 3, 3, "haar")
    assert parse_config("fp32") == CacheConfig("fp32")
    assert parse_config("mse-k4v3-hadamard-ck") == CacheConfig("mse", 4, 3, "hadamard", center_keys=True)
    assert parse_config("naive-4-ck").name == "naive-4-ck"


@pytest.mark.parametrize("bad, fragment", [
    ("mse", "needs bits"),
    ("mse-9", "expected one of 1..8"),
    ("kivi-k4v9", "expected one of 1..8"),
    ("mixed-3", "expected 1.5, 2.5 or 3.5"),
    ("prod-1", "expected 2..8"),
    ("int8-4", "'int8' takes no bits"),
    ("int8-v9", "expected one of 1..8"),
    ("mse-v4", "'-vV' is for 'int8' only"),
    ("kivi-4-hadamard", "no rotation"),
    ("naive-4-hadamard", "no rotation"),
    ("mse-4-dct", "rotation='dct'"),
    ("fp16", "METHOD"),
    ("fp32-4", "takes no bits"),
    ("fp32-ck", "takes no bits"),
    ("mse-32", "is the 'fp32' configuration"),
    ("mixed-k32v3.5", "expected 1.5, 2.5 or 3.5"),
    ("mse-4-ck-hadamard", "METHOD"),  # -ck comes last
])
def test_parse_errors_name_the_value(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_config(bad)


@pytest.mark.parametrize("name, k_bytes, v_bytes, eff_bits", [
    # head_dim 64: codes ceil(64*b/8) bytes; TurboQuant + 4 bytes per float32 norm (the paged
    # cache's layout), naive/int8 + 2 bytes per fp16 scale, KIVI keys + 2 fp16 per channel per
    # 32 tokens (8 bytes per vector), KIVI values + fp16 scale and zero (4 bytes)
    ("fp32", 256, 256, 32.0),
    ("mse-4", 36, 36, 4.5),
    ("mse-3", 28, 28, 3.5),
    ("mse-2", 20, 20, 2.5),
    ("mse-8", 68, 68, 8.5),
    ("mse-k6v4", 52, 36, 5.5),
    ("naive-4", 34, 34, 4.25),
    ("prod-3", 32, 28, 3.75),  # keys: 2-bit MSE + 1-bit QJL + two norms
    ("mixed-2.5", 28, 28, 3.5),  # 32 ch at 3 b + 32 at 2 b + two norms
    ("mixed-3.5", 36, 36, 4.5),
    ("mse-k4v2", 36, 20, 3.5),
    ("mse-k4v32", 36, 256, 18.25),  # values left in fp32
    ("kivi-4", 40, 36, 4.75),
    ("kivi-k4v2", 40, 20, 3.75),
    ("int8", 66, 66, 8.25),
    ("int8-v4", 66, 36, 6.375),
])
def test_storage_accounting(name, k_bytes, v_bytes, eff_bits):
    config = parse_config(name)
    assert config.bytes_per_vector("k", 64) == k_bytes
    assert config.bytes_per_vector("v", 64) == v_bytes
    assert config.effective_bits(64) == pytest.approx(eff_bits)
    # SmolLM2-135M: 30 layers, 3 KV heads
    assert config.bytes_per_token(64, 3, 30) == 90 * (k_bytes + v_bytes)


def test_with_bits_overrides_keys_and_values():
    assert with_bits(parse_config("mse-4-hadamard"), 4, 3) == CacheConfig("mse", 4, 3, "hadamard")
    assert with_bits(parse_config("naive-2"), None, 4) == CacheConfig("naive", 2, 4)
    assert with_bits(parse_config("fp32"), 2, 2) == CacheConfig("fp32")
    with pytest.raises(ValueError, match="mixed"):
        with_bits(parse_config("mixed-2.5"), 4, 3)


def test_cli_selection_with_kv_bits():
    from tq_deploy.commands.eval_ppl import select_configs

    names = [c.name for c in select_configs(None, 4, 3)]
    assert names == ["fp32", "mse-k4v3", "mse-k4v3-hadamard", "mse-k4v3-ck", "prod-k4v3",
                     "naive-k4v3", "kivi-k4v3"]  # mixed skipped
    assert [c.name for c in select_configs("mse-2,naive-2", None, None)] == ["mse-2", "naive-2"]
    with pytest.raises(ValueError, match="--k-bits"):
        select_configs("mixed-2.5", 4, 3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_naive_error_bound_and_extremes(bits, gen):
    x = torch.randn(5, 7, 64, generator=gen) * torch.rand(5, 7, 1, generator=gen) * 10
    q = NaiveAbsmaxQuantizer(bits)
    codes, absmax = q.encode(x)
    x_hat = q.quantize(x)
    step = 2 * absmax / (2**bits - 1)
    # nearest level: error at most half a step per coordinate
    assert ((x_hat - x).abs() <= step.unsqueeze(-1) / 2 + 1e-5).all()
    # the largest |coordinate| is reproduced exactly (both grid ends are levels)
    arg = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(x_hat.gather(-1, arg), x.gather(-1, arg), rtol=1e-5, atol=1e-5)
    assert int(codes.max()) <= 2**bits - 1


def test_naive_uses_every_code_and_keeps_zero_vectors(gen):
    q = NaiveAbsmaxQuantizer(2)
    x = torch.randn(4096, 64, generator=gen)
    codes, _ = q.encode(x)
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}
    zero = torch.zeros(3, 64, dtype=torch.float16)
    out = q.quantize(zero)
    assert out.dtype == torch.float16 and (out == 0).all()


def test_naive_is_worse_than_turboquant_on_outlier_channels(gen):
    """The property the evaluation relies on: one large channel ruins absmax steps, not a rotation."""
    from tq_deploy.reference.quantizer import TurboQuantMSE

    x = torch.randn(2000, 64, generator=gen)
    x[:, 3] *= 20  # an outlier channel, as in LLM keys
    naive = (NaiveAbsmaxQuantizer(3).quantize(x) - x).pow(2).sum() / x.pow(2).sum()
    turbo = (TurboQuantMSE(64, 3).quantize(x) - x).pow(2).sum() / x.pow(2).sum()
    assert turbo < naive


def test_mixed_channels_are_fixed_per_layer_and_head(gen):
    pytest.importorskip("transformers")
    from tq_deploy.eval.kv_quantizers import MixedKVQuantizer

    q = MixedKVQuantizer(64, 3.5, 2.5)
    first = torch.randn(1, 3, 16, 64, generator=gen)
    first[:, 0, :, :32] *= 10  # head 0: the first 32 channels dominate
    first[:, 1, :, 32:] *= 10  # head 1: the last 32
    q.quantize_keys(first, layer_idx=0)
    assert q.channels[(0, "keys", 0)].tolist() == list(range(32))
    assert q.channels[(0, "keys", 1)].tolist() == list(range(32, 64))
    later = torch.randn(1, 3, 8, 64, generator=gen)
    later[:, 0, :, 32:] *= 10  # the data changes, the stored choice does not
    before = {k: v.clone() for k, v in q.channels.items()}
    out = q.quantize_keys(later, layer_idx=0)
    assert {k: v.tolist() for k, v in q.channels.items()} == {k: v.tolist() for k, v in before.items()}
    assert out.shape == later.shape and not torch.equal(out, later)


def test_centered_keys_leave_attention_unchanged(gen):
    """The deployed form stores quantize(k - mu) and drops mu; the evaluation adds mu back.
    Both give the same attention weights because every score of a query moves by q.mu."""
    pytest.importorskip("transformers")
    from tq_deploy.eval.kv_quantizers import CenteredKeys, RoundTripKVQuantizer
    from tq_deploy.reference.quantizer import TurboQuantMSE

    keys = torch.randn(1, 3, 40, 64, generator=gen) + 5 * torch.randn(1, 3, 1, 64, generator=gen)
    query = torch.randn(1, 3, 7, 64, generator=gen)
    turbo = TurboQuantMSE(64, 3)
    centered = CenteredKeys(RoundTripKVQuantizer(turbo, turbo))
    evaluated = centered.quantize_keys(keys, layer_idx=0)  # quantize(k - mu) + mu
    mean = centered.means[0]
    torch.testing.assert_close(mean, keys.mean(dim=2, keepdim=True))
    deployed = turbo.quantize(keys - mean)  # what a cache would hold
    weights = [torch.softmax(query @ k.transpose(-1, -2) / 8, dim=-1) for k in (evaluated, deployed)]
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)
    # and centering made the reconstruction better than quantizing k directly (k has a large offset)
    plain = (turbo.quantize(keys) - keys).pow(2).sum()
    assert (evaluated - keys).pow(2).sum() < plain
    # the mean is fixed from the first call
    later = centered.quantize_keys(keys + 1, layer_idx=0)
    torch.testing.assert_close(centered.means[0], mean)
    assert later.shape == keys.shape


def test_a_32_bit_side_is_left_unquantized(gen):
    pytest.importorskip("transformers")
    from tq_deploy.eval.kv_quantizers import build_kv_quantizer

    x = torch.randn(1, 3, 9, 64, generator=gen)
    keys_only = build_kv_quantizer(parse_config("mse-k3v32"), 64)
    values_only = build_kv_quantizer(parse_config("naive-k32v2"), 64)
    assert torch.equal(keys_only.quantize_values(x, 0), x) and not torch.equal(keys_only.quantize_keys(x, 0), x)
    assert torch.equal(values_only.quantize_keys(x, 0), x) and not torch.equal(values_only.quantize_values(x, 0), x)


def test_kivi_keys_per_channel_and_values_per_token(gen):
    """Per channel: an outlier channel sets only its own step; per token: one range per vector."""
    from tq_deploy.eval.baselines import PerChannelKeyQuantizer, PerTokenAsymmetricQuantizer

    bits, group = 3, 8
    x = torch.randn(2, 3, 20, 16, generator=gen)
    x[..., 5] *= 50  # an outlier channel
    out = PerChannelKeyQuantizer(bits, group).quantize(x)
    for start in range(0, 20, group):  # groups 0-7, 8-15, 16-19 (the last one shorter)
        g, o = x[..., start:start + group, :], out[..., start:start + group, :]
        lo, hi = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
        step = (hi - lo) / (2**bits - 1)
        assert ((o - g).abs() <= step / 2 + 1e-4).all()  # nearest level of the channel's own grid
        # every value sits on its channel's grid lo + k * step
        k = (o - lo) / step
        torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
    # the ordinary channels keep a small error although channel 5 is 50x larger
    normal = torch.ones(16, dtype=torch.bool)
    normal[5] = False
    assert (out - x)[..., normal].abs().max() < 1.0
    v = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    # 2 bits on [-1, 3]: levels -1, 1/3, 5/3, 3 -> nearest of each coordinate
    torch.testing.assert_close(PerTokenAsymmetricQuantizer(2).quantize(v), torch.tensor([[-1.0, 1 / 3, 1 / 3, 3.0]]))


def test_int8_absmax_levels(gen):
    from tq_deploy.eval.baselines import Int8AbsmaxQuantizer

    x = torch.randn(50, 64, generator=gen) * 3
    out = Int8AbsmaxQuantizer().quantize(x)
    a = x.abs().amax(-1, keepdim=True)
    assert ((out - x).abs() <= a / 127 / 2 + 1e-6).all()
    torch.testing.assert_close(out * 127 / a, (out * 127 / a).round(), atol=1e-4, rtol=0)
    assert (Int8AbsmaxQuantizer().quantize(torch.zeros(2, 8)) == 0).all()


def test_layer_plan_quantizer_uses_each_layers_widths(gen):
    from tq_deploy.eval.kv_quantizers import LayerPlanKVQuantizer
    from tq_deploy.reference.quantizer import TurboQuantMSE

    q = LayerPlanKVQuantizer([(6, 4), (32, 2)], 64, seed=3)
    x = torch.randn(1, 2, 5, 64, generator=gen)
    torch.testing.assert_close(q.quantize_keys(x, 0), TurboQuantMSE(64, 6, 3).quantize(x))
    # one rotation per layer, seed + layer, for keys and values: the exported model's convention
    torch.testing.assert_close(q.quantize_values(x, 0), TurboQuantMSE(64, 4, 3).quantize(x))
    assert torch.equal(q.quantize_keys(x, 1), x)  # 32: unquantized
    torch.testing.assert_close(q.quantize_values(x, 1), TurboQuantMSE(64, 2, 4).quantize(x))
    with pytest.raises(ValueError, match="layer 2 is not in the plan of 2 layers"):
        q.quantize_keys(x, 2)


def test_shipped_texts_resolve():
    from tq_deploy.eval.model import SHIPPED_TEXTS, read_text, resolve_texts

    both = resolve_texts(None)
    assert [name for name, _ in both] == list(SHIPPED_TEXTS) == ["austen", "darwin"]
    assert resolve_texts(["shipped", "darwin"]) == both
    for _, path in both:
        text = read_text(path)
        assert len(text) > 15000 and "Project Gutenberg" not in text
    with pytest.raises(ValueError, match="--text='nope.txt' is neither a file nor a shipped text"):
        resolve_texts(["nope.txt"])


@pytest.mark.parametrize("argv, fragment", [
    (["--kv-preset", "fast"], "--kv-preset='fast', expected one of quality, balanced, compact, small"),
    (["--kv-preset", "quality", "--k-bits", "4"], "--kv-preset='quality' with --k-bits/--v-bits"),
    (["--text", "missing.txt"], "--text='missing.txt' is neither a file nor a shipped text"),
    (["--seeds", "0"], "--seeds=0, expected >= 1"),
    (["--rounding-draws"], "--rounding-draws with --seeds=1 and --backend torch, expected --seeds >= 2"),
    (["--rounding-draws", "--seeds", "2", "--backend", "ort"], "--rounding-draws with --seeds=2 and --backend ort"),
    (["--rounding-draw", "1", "--rounding-draws", "--seeds", "2"], "--rounding-draw=1, expected 0 with --rounding-draws or --backend ort"),
    (["--rounding-draw", "2", "--backend", "ort"], "--rounding-draw=2, expected"),
    (["--torch-draws", "2"], "--torch-draws with --backend torch, expected --backend ort"),
    (["--backend", "ort", "--kv-preset", "compact", "--torch-draws", "2"],
     "--torch-draws=2, expected >= 1, and 1 without --check-torch"),
    (["--backend", "ort", "--kv-preset", "compact", "--check-torch", "--torch-draws", "0"], "--torch-draws=0, expected >= 1"),
    (["--backend", "ort", "--onnx", "m.onnx", "--seeds", "2"], "--seeds=2 with --onnx, expected 1"),
])
def test_eval_ppl_bad_options_are_one_line(argv, fragment, capsys):
    from tq_deploy.cli import main

    assert main(["eval-ppl", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_seed_means_against_pytorch_draws():
    """eval-ppl --backend ort's closing lines: the means over seeds of hand-made rows; one seed has no
    standard error (None in JSON, none printed), and the JSON stays strict."""
    import json
    import math

    from tq_deploy.commands.eval_ppl import seed_mean_line
    from tq_deploy.eval.exported import seed_means

    def row(seed, ppl, torch_ppl, text="austen"):
        return {"text": text, "config": "compact", "seed": seed, "ppl": ppl, "torch_ppl": torch_ppl,
                "rel_diff": ppl / torch_ppl - 1, "torch_ppl_by_draw": [torch_ppl - 0.1, torch_ppl + 0.1]}

    (one,) = seed_means([row(0, 10.0, 10.1)])
    assert one["rel_diff_stderr"] is None and one["torch_draws"] == 2
    json.dumps(one, allow_nan=False)
    line = seed_mean_line(one)
    assert "mean over 1 seed (0)" in line and "-0.990 %" in line and "standard error" not in line

    austen, darwin = seed_means([row(0, 10.0, 10.1), row(30, 10.3, 10.1), row(0, 20.0, 20.0, "darwin")])
    assert austen["seeds"] == [0, 30] and darwin["seeds"] == [0]
    assert math.isclose(austen["ppl"], 10.15) and math.isclose(austen["torch_ppl"], 10.1)
    assert math.isclose(austen["rel_diff"], 10.15 / 10.1 - 1)
    diffs = [10.0 / 10.1 - 1, 10.3 / 10.1 - 1]
    assert math.isclose(austen["rel_diff_mean"], sum(diffs) / 2)
    assert math.isclose(austen["rel_diff_stderr"], abs(diffs[1] - diffs[0]) / 2)
    assert "mean over 2 seeds (0, 30)" in seed_mean_line(austen) and "+- 1.485 % standard error" in seed_mean_line(austen)
    assert "PyTorch" not in seed_mean_line(seed_means([{"text": "t", "config": "c", "seed": 0, "ppl": 5.0}])[0])
