"""KV presets and per-layer bit plans: the preset table, the CLI options, and an exported plan
(one layer per preset) in ONNX Runtime against the reference."""

from __future__ import annotations

import argparse
import json

import onnx
import pytest
import torch

from tq_deploy import ops
from tq_deploy.presets import PRESETS, BitPlan, effective_bits, get_preset, write_plan
from tq_deploy.reference.model import TQDecodeModel, TQDecodeStack, TQModelConfig, decode_model, example_inputs


def test_effective_bits_convention():
    # codes plus one float32 norm per vector of D coordinates
    assert effective_bits(4, 4, 64) == 4.5 and effective_bits(4, 4, 128) == 4.25
    assert effective_bits(6, 4, 128) == 5.25 and effective_bits(5, 3, 128) == 4.25
    assert BitPlan(((6, 4), (4, 2)), 64).effective_bits() == pytest.approx((5.5 + 3.5) / 2)
    # float16 norms: 16 bits per vector instead of 32
    assert effective_bits(5, 4, 64, "float16") == 4.75 and effective_bits(4, 4, 128, "float16") == 4.125
    assert BitPlan(((5, 4), (4, 4)), 64, norm_dtype="float16").effective_bits() == pytest.approx((4.75 + 4.25) / 2)


def test_a_plan_carries_its_norm_dtype(tmp_path):
    from tq_deploy.eval.calibrate import Sensitivity, allocate
    from tq_deploy.presets import load_plan

    plan = BitPlan(((5, 4), (4, 3)), 64, {"name": "n16"}, "generated", "float16")
    path = tmp_path / "plan.json"
    write_plan(path, plan)
    assert json.loads(path.read_text())["norm_dtype"] == "float16"
    assert load_plan(path) == plan and load_plan(path).norm_dtype == "float16"
    write_plan(path, BitPlan(((5, 4),), 64))
    assert "norm_dtype" not in json.loads(path.read_text()) and load_plan(path).norm_dtype == "float32"
    with pytest.raises(ValueError, match="plan norm_dtype='bfloat16', expected one of"):
        BitPlan(((5, 4),), 64, norm_dtype="bfloat16")
    # a memory budget counts the norms at their width: 4.75 bits are k5v4 in both layers with float16 norms
    sens = Sensitivity(0.0, {"k": 3, "v": 2}, {(layer, side): 0.01 for layer in range(2) for side in "kv"}, 64, 2,
                       0.0)
    assert allocate(sens, max_effective_bits=4.75, norm_dtype="float16") == [(5, 4), (5, 4)]
    assert allocate(sens, max_effective_bits=4.75) == [(5, 4), (4, 4)]


def test_presets_meet_their_stated_budgets():
    quality, compact, small = get_preset("quality"), get_preset("compact"), get_preset("small")
    assert compact.effective_bits(64) <= 4.75 and small.effective_bits(64) <= 4.25
    assert compact.norm_dtype == small.norm_dtype == "float16"
    for preset in (quality, compact, small):
        assert set(preset.measured) == {"austen", "darwin"}
        assert all(m.seeds >= 4 for m in preset.measured.values())
    assert all(m.delta_pct <= 1.0 for m in quality.measured.values())  # the quality promise, both texts
    assert get_preset(" Quality ") is quality


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"--kv-preset='fast', expected one of " + ", ".join(PRESETS)):
        get_preset("fast")


def _export_args(**kw):
    from tq_deploy.commands.export import MODEL_OPTIONS

    values = {name: None for name in MODEL_OPTIONS}
    values.update(bits=None, k_bits=None, v_bits=None, rotation=None, kv_preset=None, plan=None)
    values.update(kw)
    return argparse.Namespace(**values)


def test_export_options_take_a_preset_or_a_plan(tmp_path):
    from tq_deploy.commands.export import config_from_args

    quality = get_preset("quality")
    config = config_from_args(_export_args(kv_preset="quality", head_dim=128))
    assert (config.k_bits, config.v_bits, config.head_dim) == (quality.k_bits, quality.v_bits, 128)
    with pytest.raises(ValueError, match="--kv-preset='quality' with --k-bits"):
        config_from_args(_export_args(kv_preset="quality", k_bits=4))
    path = tmp_path / "plan.json"
    write_plan(path, BitPlan(((6, 4), (5, 3), (8, 2)), 64))
    config = config_from_args(_export_args(plan=str(path)))
    assert config.num_layers == 3 and config.layer_bits == ((6, 4), (5, 3), (8, 2)) and config.head_dim == 64
    with pytest.raises(ValueError, match="--head-dim=128 with --plan"):
        config_from_args(_export_args(plan=str(path), head_dim=128))
    with pytest.raises(ValueError, match="--num-layers=2 with --plan"):
        config_from_args(_export_args(plan=str(path), num_layers=2))
    with pytest.raises(ValueError, match="--plan=.* with --bits"):
        config_from_args(_export_args(plan=str(path), bits=4))


def test_the_synthetic_model_says_what_of_a_preset_it_leaves_out(capsys):
    from tq_deploy.commands.export import config_from_args

    compact = get_preset("compact")
    config = config_from_args(_export_args(kv_preset="compact"))
    assert (config.k_bits, config.v_bits) == (compact.k_bits, compact.v_bits)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--kv-preset compact's widths only (k{compact.k_bits}v{compact.v_bits})" in err
    assert "float16 norms and a key mean (generated)" in err
    config_from_args(_export_args(kv_preset="balanced"))  # widths are all of it: nothing to say
    assert capsys.readouterr().err == ""


def test_stack_is_its_layers_in_sequence(seed):
    """The reference of a plan: layer l is TQDecodeModel(config.layer_config(l)) fed the previous output."""
    config = TQModelConfig(hidden_size=64, num_q_heads=4, num_kv_heads=2, head_dim=32, num_blocks=12,
                           max_blocks_per_seq=4, num_layers=2, layer_bits=((6, 4), (2, 7)), seed=seed % 100)
    stack = decode_model(config)
    assert isinstance(stack, TQDecodeStack)
    inputs = example_inputs(config, [3, 20], seed=seed)
    assert inputs["k_codes.0"].shape[-1] == ops.packed_size(32, 6)
    assert inputs["v_codes.1"].shape[-1] == ops.packed_size(32, 7)
    with torch.no_grad():
        out, *caches = stack(*(t.clone() for t in inputs.values()))
        hidden = inputs["hidden"]
        for layer in range(2):
            single = TQDecodeModel(TQModelConfig(hidden_size=64, num_q_heads=4, num_kv_heads=2, head_dim=32,
                                                 num_blocks=12, max_blocks_per_seq=4, seed=seed % 100 + layer,
                                                 k_bits=config.layer_bits[layer][0],
                                                 v_bits=config.layer_bits[layer][1]))
            step = [inputs[n] for n in ("positions", "slot_mapping", "block_tables", "context_lens")]
            layer_caches = [inputs[f"{n}.{layer}"].clone() for n in ("k_codes", "k_norms", "v_codes", "v_norms")]
            hidden, *updated = single(hidden, *step, *layer_caches)
            for got, want in zip(caches[4 * layer:4 * layer + 4], updated):
                assert torch.equal(got, want)
    torch.testing.assert_close(out, hidden, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer_bits has 1 entries, expected num_layers=2"):
        TQModelConfig(num_layers=2, layer_bits=((4, 4),))
    with pytest.raises(ValueError, match=r"layer_bits\[1\] v_bits=9"):
        TQModelConfig(num_layers=2, layer_bits=((4, 4), (4, 9)))


def test_presets_as_a_plan_export_and_match_the_reference_in_ort(tmp_path, capsys, ort_library):
    """`tq-deploy export --plan` with one layer per preset, then `tq-deploy run --compare` (ORT CPU)."""
    from tq_deploy.cli import main

    names = list(PRESETS)
    plan = BitPlan(tuple((PRESETS[n].k_bits, PRESETS[n].v_bits) for n in names), 64)
    plan_path, model_path = tmp_path / "plan.json", tmp_path / "model.onnx"
    write_plan(plan_path, plan)
    assert main(["export", "--out", str(model_path), "--plan", str(plan_path), "--hidden-size", "64",
                 "--num-q-heads", "4", "--num-kv-heads", "2", "--num-blocks", "16", "--max-blocks", "4"]) == 0
    model = onnx.load(model_path)
    custom = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert len(custom) == 2 * len(names)
    for node in custom:
        attrs = {a.name: a.i for a in node.attribute if a.name in ("k_bits", "v_bits")}
        layer = int(node.input[-1].split(".")[1])  # layers.L.v_codebook
        preset = PRESETS[names[layer]]
        assert attrs == {"k_bits": preset.k_bits, "v_bits": preset.v_bits}
        codebook = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[-2]))
        assert codebook.shape == (2 ** preset.k_bits,)
    capsys.readouterr()
    assert main(["run", str(model_path), "--compare", "--repeat", "1", "--json", "--context-lens", "1", "9", "30"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["comparison"]["passed"]
    outputs = {o["name"] for o in result["comparison"]["outputs"]}
    assert {f"k_codes_out.{i}" for i in range(len(names))} <= outputs


def test_every_preset_is_labelled_by_the_name_its_rows_carry():
    """eval-ppl / eval-needle rows carry the parsed configuration's name (k4v4 reads mse-4): every preset's
    label must be found under it."""
    from tq_deploy.commands.eval_ppl import select_presets
    from tq_deploy.presets import preset_names

    configs, labels = select_presets(preset_names())
    for name, config in zip(preset_names(), configs):
        assert labels[config.name].startswith(f"{name} (")
