"""tq-deploy calibrate: the sensitivity model, the greedy allocation and a plan through the whole path.

No real model needed: the allocation is checked against sensitivities written by hand, and the
probes run on a tiny random Llama (transformers) in well under a second.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tq_deploy.presets import BitPlan, effective_bits, load_plan, write_plan
from tq_deploy.reference.codebook import expected_mse


def _sens(kl_k, kl_v, head_dim=64, probe=(4, 3)):
    from tq_deploy.eval.calibrate import Sensitivity

    n = len(kl_k)
    kl = {**{(i, "k"): d for i, d in enumerate(kl_k)}, **{(i, "v"): d for i, d in enumerate(kl_v)}}
    return Sensitivity(3.0, {"k": probe[0], "v": probe[1]}, kl, head_dim, n, 0.0)


def test_prediction_scales_with_turboquant_mse():
    s = _sens([0.02, 0.0], [0.004, -0.001])
    # keys probed at 4 bits: at 6 bits the predicted dNLL shrinks by the codebook MSE ratio
    assert s.predicted_dnll(0, "k", 6) == pytest.approx(0.02 * expected_mse(64, 6) / expected_mse(64, 4))
    assert s.predicted_dnll(0, "v", 3) == pytest.approx(0.004)
    assert s.predicted_dnll(1, "v", 2) == 0.0  # no measured change: no sensitivity
    layers = [(4, 3), (2, 8)]
    expected = math.expm1(0.02 + 0.004 + 0.0 + 0.0) * 100
    assert s.predicted_delta_pct(layers) == pytest.approx(expected)


def test_memory_budget_gives_bits_to_the_sensitive_side():
    from tq_deploy.eval.calibrate import allocate

    # layer 0 keys matter most, layer 2 not at all
    s = _sens([0.05, 0.01, 0.0], [0.005, 0.002, 0.0])
    layers = allocate(s, max_effective_bits=4.0, min_bits=2, max_bits=6)
    mean = sum(effective_bits(k, v, 64) for k, v in layers) / 3
    assert mean <= 4.0 + 1e-9 and mean > 4.0 - 1 / 6  # the budget is used up to the last bit
    assert layers[0][0] == max(k for k, _ in layers)  # the most sensitive side is widest
    assert layers[2] == (2, 2)  # insensitive layer stays at min_bits
    assert layers[0][0] > layers[1][0]
    # A bigger budget never lowers any width (greedy order).
    wider = allocate(s, max_effective_bits=4.5, min_bits=2, max_bits=6)
    assert all(a >= b for pair_a, pair_b in zip(wider, layers) for a, b in zip(pair_a, pair_b))
    assert s.predicted_delta_pct(wider) < s.predicted_delta_pct(layers)


def test_ppl_budget_is_met_with_the_fewest_bits():
    from tq_deploy.eval.calibrate import allocate

    s = _sens([0.05, 0.01, 0.002], [0.005, 0.002, 0.001])
    layers = allocate(s, max_delta_pct=1.0, max_bits=6)
    assert s.predicted_delta_pct(layers) <= 1.0
    # the last bit given was needed: the plan one bit smaller there (the side with the smallest
    # gain of its last bit) breaks the budget
    gains = {(i, side): s.predicted_dnll(i, "kv"[side], layers[i][side] - 1)
             - s.predicted_dnll(i, "kv"[side], layers[i][side])
             for i in range(3) for side in (0, 1) if layers[i][side] > 2}
    i, side = min(gains, key=gains.get)
    fewer = [list(p) for p in layers]
    fewer[i][side] -= 1
    assert s.predicted_delta_pct([tuple(p) for p in fewer]) > 1.0
    # unreachable: refused, not an all-max_bits plan that claims the budget
    with pytest.raises(ValueError, match=r"max_delta_pct=1e-09% cannot be met: every layer at max_bits=3 predicts"):
        allocate(s, max_delta_pct=1e-9, max_bits=3)
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate(s)
    with pytest.raises(ValueError, match="max_effective_bits=1"):
        allocate(s, max_effective_bits=1.0)


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers", reason="needs the eval extra: pip install .[eval]")
    from tq_deploy.eval.model import LoadedModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return LoadedModel(model, None, "tiny-llama", 3, 4, 2, 16)


def test_evaluate_rows_for_presets_and_plans(tiny):
    """evaluate() labels a preset's row and scores a uniform plan exactly as the configuration it spells out."""
    from tq_deploy.eval.perplexity import evaluate

    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(2))
    plan = BitPlan(((5, 3),) * 3, 16, {"name": "uniform"})
    rows = evaluate(["mse-k5v3", plan], tiny, ids, chunk_size=16, labels={"mse-k5v3": "compact (mse-k5v3)"})
    assert [r["config"] for r in rows] == ["fp32", "compact (mse-k5v3)", "uniform"]
    assert rows[2]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-6)
    assert rows[2]["effective_bits"] == rows[1]["effective_bits"] == effective_bits(5, 3, 16)
    assert rows[2]["kv_bytes_per_token"] == rows[1]["kv_bytes_per_token"] == 3 * 2 * (10 + 4 + 6 + 4)
    with pytest.raises(ValueError, match="plan for head_dim 64, 1 layers; expected the model's head_dim 16 and 3"):
        evaluate([BitPlan(((4, 4),), 64)], tiny, ids)


def test_calibrate_on_a_tiny_model_and_the_plan_round_trip(tiny, tmp_path):
    from tq_deploy.eval.calibrate import allocate, make_plan, measure_sensitivity
    from tq_deploy.eval.kv_quantizers import LayerPlanKVQuantizer
    from tq_deploy.eval.perplexity import perplexity

    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(1))
    seen = []
    sens = measure_sensitivity(tiny, ids, 2, 1, chunk_size=16, progress=lambda *a: seen.append(a[:2]))
    assert seen == [(layer, side) for layer in range(3) for side in ("k", "v")]
    # a probe is the NLL change of exactly that one side of that layer
    base = perplexity(tiny.model, ids, None, 16, return_logits=True)
    plan = [(32, 32)] * 3
    plan[1] = (32, 1)
    probe = perplexity(tiny.model, ids, LayerPlanKVQuantizer(plan, 16), 16, return_logits=True)
    assert sens.dnll[(1, "v")] == pytest.approx((probe.nll_sum - base.nll_sum) / 47, abs=1e-6)
    # the KL of that probe, computed here with torch's kl_div over the 47 predicting positions
    expected_kl = torch.nn.functional.kl_div(torch.log_softmax(probe.logits[:47].double(), -1),
                                             torch.log_softmax(base.logits[:47].double(), -1),
                                             log_target=True, reduction="sum") / 47
    assert sens.kl[(1, "v")] == pytest.approx(float(expected_kl), rel=1e-6)
    assert all(kl >= 0 for kl in sens.kl.values()) and max(sens.kl.values()) > 1e-6
    layers = allocate(sens, max_effective_bits=4.5, head_dim=16, max_bits=5)
    bit_plan = make_plan(sens, layers, {"name": "tiny", "text": "random"})
    path = tmp_path / "plan.json"
    write_plan(path, bit_plan)
    again = load_plan(path)
    assert again == bit_plan and again.info["name"] == "tiny" and again.key_mean is None
    assert json.loads(path.read_text())["format"] == "tq-deploy-bit-plan"
    assert "key_mean" not in json.loads(path.read_text())
    with_mean = make_plan(sens, layers, {"name": "tiny"}, "generated")
    write_plan(path, with_mean)
    again = load_plan(path)
    assert again.key_mean == "generated" and json.loads(path.read_text())["key_mean"] == "generated"
    assert again != bit_plan and "key_mean" not in again.info


@pytest.mark.parametrize("edit, fragment", [
    ({"format": "other"}, "expected 'tq-deploy-bit-plan'"),
    ({"layers": [{"k_bits": 9, "v_bits": 4}]}, "k_bits=9, expected one of"),
    ({"layers": [{"k_bits": 4}]}, "no 'v_bits'"),
    ({"num_layers": 3}, "num_layers=3, expected 1"),
    ({"head_dim": "64"}, "head_dim='64'"),
    ({"key_mean": ""}, "key_mean='', expected the key mean's calibration source"),
    ({"key_mean": 3}, "key_mean=3, expected"),
    ({"key_mean": "none"}, "key_mean='none', expected"),
])
def test_bad_plans_are_one_clear_line(tmp_path, edit, fragment):
    data = BitPlan(((6, 4),), 64).to_dict()
    data.update(edit)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_plan(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


def test_rounding_draws_give_the_methods_that_draw_nothing_a_spread(tiny):
    """evaluate(rounding_draws=True): KIVI runs once per seed, draw 0 on the model as it is and draws i > 0
    on embeddings perturbed at float32-rounding size, restored afterwards; TurboQuant rows are unchanged."""
    from tq_deploy.eval.perplexity import evaluate, rounding_draw

    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(2))
    weight = tiny.model.get_input_embeddings().weight
    before = weight.detach().clone()
    with rounding_draw(tiny.model, 1):
        changed = weight.detach().clone()
    assert torch.equal(weight, before)
    relative = (changed / before - 1)[before != 0]
    assert 0 < relative.abs().max() < 1e-6 and relative.std() == pytest.approx(1e-7, rel=0.1)
    plain = evaluate(["kivi-2", "mse-k3v2"], tiny, ids, chunk_size=16, seeds=3)
    drawn = evaluate(["kivi-2", "mse-k3v2"], tiny, ids, chunk_size=16, seeds=3, rounding_draws=True)
    assert [len(r["ppl_by_seed"]) for r in plain] == [1, 1, 3]
    assert [len(r["ppl_by_seed"]) for r in drawn] == [1, 3, 3]
    assert drawn[1]["ppl_by_seed"][0] == plain[1]["ppl"]  # draw 0: the model as it is
    assert drawn[0]["ppl"] == plain[0]["ppl"] and drawn[2]["ppl_by_seed"] == plain[2]["ppl_by_seed"]
    assert torch.equal(weight, before)
    # draw=1: every row on the perturbed model, the one draw a whole run is made with
    whole = evaluate(["kivi-2", "mse-k3v2"], tiny, ids, chunk_size=16, seeds=3, draw=1)
    assert [len(r["ppl_by_seed"]) for r in whole] == [1, 1, 3]
    assert whole[1]["ppl"] == drawn[1]["ppl_by_seed"][1]  # KIVI's draw 1 of the run above
    assert whole[0]["ppl"] == pytest.approx(plain[0]["ppl"], rel=1e-5)  # fp32 moves by rounding at most
    assert torch.equal(weight, before)
    with pytest.raises(ValueError, match="draw=1 with rounding_draws=True"):
        evaluate(["kivi-2"], tiny, ids, chunk_size=16, seeds=2, rounding_draws=True, draw=1)
