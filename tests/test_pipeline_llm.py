"""tq-deploy pipeline on a real-model-shaped LLM: export -> ORT session -> generate -> compare -> engine -> polygraphy.

A small random Llama with SmolLM2's tokenizer stands in for SmolLM2 (same vocabulary and code
path, seconds instead of minutes); the README's main command runs the pipeline on SmolLM2 itself.
"""

from __future__ import annotations

import json

import pytest

from tq_deploy.cli import main

from llama_support import random_checkpoint

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A 2-layer random Llama (SmolLM2's vocabulary, tied embeddings) with SmolLM2's tokenizer beside it."""
    from tq_deploy.models.checkpoint import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2")
    except ValueError as err:
        pytest.skip(f"SmolLM2's tokenizer is not installed (extra eval): {err}")
    folder = tmp_path_factory.mktemp("tiny_llm")
    random_checkpoint(folder, vocab_size=tokenizer.vocab_size, num_hidden_layers=2, tie_word_embeddings=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_llm_pipeline_passes_and_its_verdict_is_every_steps(tiny_llm, tmp_path, capsys, ort_library):
    status = main(["pipeline", "--model", str(tiny_llm), "--out-dir", str(tmp_path), "--kv-preset", "compact",
                   "--new-tokens", "5", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0, report
    assert report["passed"] is True
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    generation = report["generation"]
    assert generation["ort_cpu"]["agreement"] in ("identical", "same codes"), generation["ort_cpu"]
    if generation["ort_cpu"]["agreement"] == "identical":
        assert generation["ort_cpu"]["tokens"] == generation["reference"]["tokens"]
    assert [len(t) for t in generation["reference"]["tokens"]] == [5, 5]
    cpu = report["ort_cpu"]
    assert cpu["passed"] and any(o["name"] == "logits" for o in cpu["outputs"])
    ties = cpu["code_ties"]
    assert ties["compared"] > 0 and not ties["not_ties"]
    config = report["config"]
    assert (config["k_bits"], config["v_bits"], config["key_mean"], config["norm_dtype"]) == (5, 4, True, "float16")
    stage = report["tensorrt"]
    assert stage["status"] in ("built", "skipped"), stage
    if stage["status"] == "built":
        assert (tmp_path / "model.engine").stat().st_size == stage["engine_bytes"] > 0
    if report["polygraphy"]["status"] == "ran":
        assert report["polygraphy"]["passed"] is True


def test_llm_pipeline_text_names_each_step(tiny_llm, tmp_path, capsys, ort_library):
    assert main(["pipeline", "--model", str(tiny_llm), "--out-dir", str(tmp_path), "--new-tokens", "3",
                 "--prompt", "Hello there"]) == 0
    text = capsys.readouterr().out
    for step in ("1. export", "2. check", "3. session", "4. generate [0]", "5. compare", "5b. ORT CUDA",
                 "6. engine", "7. polygraphy", "result: PASSED"):
        assert step in text, text
    assert "identical to the PyTorch reference decoder's" in text


def test_llm_pipeline_refuses_synthetic_shape_options(tiny_llm, tmp_path, capsys):
    assert main(["pipeline", "--model", str(tiny_llm), "--out-dir", str(tmp_path), "--head-dim", "32"]) == 2
    err = capsys.readouterr().err
    assert "--head-dim" in err and err.count("\n") == 1


def test_compare_llm_fails_a_backend_whose_codes_are_not_ties(tiny_llm, tmp_path, ort_library):
    """The aligned comparison can fail: ORT's outputs judged against a reference whose rotation (seed) differs."""
    from tq_deploy.export.llm import export_llm
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.runtime.session import make_session
    from tq_deploy.validate.llm import as_numpy, compare_llm, llm_inputs, reference_decoder

    path = tmp_path / "m.onnx"
    export_llm(str(tiny_llm), path, k_bits=4, v_bits=4)
    model = ExportedModel.load(path)
    feeds = llm_inputs(model, seed=3)
    session = make_session(str(path))
    actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, as_numpy(feeds))))
    assert compare_llm(model, feeds, actual, "same").passed
    wrong = reference_decoder(ExportedModel.load(path))
    with __import__("torch").no_grad():
        for layer in wrong.layers:
            layer.self_attn.rotation.copy_(layer.self_attn.rotation.flip(0))
    report = compare_llm(model, feeds, actual, "other rotation", decoder=wrong)
    assert not report.passed
    assert report.extra["code_ties"]["not_ties"]


def test_eval_ppl_through_ort_is_the_reference_on_the_same_codes(tiny_llm, tmp_path, capsys, ort_library):
    from tq_deploy.export.llm import export_llm

    path = tmp_path / "m.onnx"
    export_llm(str(tiny_llm), path, k_bits=3, v_bits=2)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 4)
    status = main(["eval-ppl", "--backend", "ort", "--onnx", str(path), "--text", str(text), "--tokens", "40",
                   "--chunk-size", "16", "--check-torch", "--json", "-"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert status == 0 and rows and all(r["aligned_passed"] for r in rows), rows
    assert all(abs(r["aligned_rel_diff"]) <= 1e-4 for r in rows)


def test_tokens_that_part_from_the_free_running_reference_are_judged_on_the_same_codes(tiny_llm, tmp_path,
                                                                                     ort_library):
    """Step 4's verdict where the free-running reference's tokens differ (here: made to): ORT's tokens pass
    when the reference stepped on ORT's codes chooses them, and fail when they are not what ORT made."""
    from tq_deploy.commands.pipeline_llm import _agreement_line, _generate, _tokenizer, tokens_agree
    from tq_deploy.export.llm import export_llm
    from tq_deploy.export.loaded import ExportedModel

    path = tmp_path / "m.onnx"
    export_llm(str(tiny_llm), path, k_bits=4, v_bits=3, block_size=8)
    model = ExportedModel.load(path)
    tokenizer, prompts, steps = _tokenizer(model), ["The capital of France is", "Water"], {}
    ort = _generate(model, "cpu", prompts, tokenizer, 4, steps)
    other = {"tokens": [t[:2] + [(t[2] + 1) % 1000] + t[3:] for t in ort["tokens"]]}  # a reference that parted
    assert tokens_agree(model, "cpu", prompts, tokenizer, 4, ort, other)
    assert ort["agreement"] == "same codes" and "rounding tie" in _agreement_line(ort)
    assert "every token the reference's greedy choice" in ort["same_codes"]
    wrong = {**ort, "tokens": other["tokens"]}  # tokens ORT did not make
    assert not tokens_agree(model, "cpu", prompts, tokenizer, 4, wrong, ort)
    assert wrong["agreement"] == "different" and "DIFFERENT" in _agreement_line(wrong)
    same = dict(ort)
    assert tokens_agree(model, "cpu", prompts, tokenizer, 4, same, {"tokens": ort["tokens"]})
    assert same["agreement"] == "identical"


def test_eval_ppl_through_ort_over_seeds_against_pytorch_draws(tiny_llm, tmp_path, capsys, ort_library,
                                                               single_thread):
    """`eval-ppl --backend ort --seeds 2 --check-torch --torch-draws 2`: one export per seed, at the PyTorch
    `--seeds` convention's seeds; draw 0 of the PyTorch check is the plain PyTorch eval of that seed, draw 1
    the same under rounding noise; the means are the rows' means."""
    from tq_deploy.eval.configs import parse_config
    from tq_deploy.eval.kv_quantizers import build_kv_quantizer
    from tq_deploy.eval.model import read_text, tokenize
    from tq_deploy.eval.perplexity import perplexity, rounding_draw
    from tq_deploy.models import load_hf_model, resolve_source
    from tq_deploy.models.checkpoint import load_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 4)
    common = ["eval-ppl", "--backend", "ort", "--model-dir", str(tiny_llm), "--gguf-file", "none",
              "--configs", "mse-k3v2", "--text", str(text), "--tokens", "40", "--chunk-size", "16", "--json", "-"]
    assert main([*common, "--seeds", "2", "--check-torch", "--torch-draws", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows, means = out["rows"], out["means"]
    assert [r["seed"] for r in rows] == [0, 2]  # seed + max(2, layers) * i, as `eval-ppl --seeds` in PyTorch
    assert all(r["aligned_passed"] and len(r["torch_ppl_by_draw"]) == 2 for r in rows), rows

    hf, tokenizer = load_hf_model(resolve_source(str(tiny_llm))), load_tokenizer(str(tiny_llm))
    ids = tokenize(tokenizer, read_text(text), 40)
    config = parse_config("mse-k3v2")
    for row in rows:
        head_dim = hf.config.hidden_size // hf.config.num_attention_heads
        plain = perplexity(hf, ids, build_kv_quantizer(config, head_dim, row["seed"]), 16).ppl
        with rounding_draw(hf, 1):
            drawn = perplexity(hf, ids, build_kv_quantizer(config, head_dim, row["seed"]), 16).ppl
        assert row["torch_ppl_by_draw"] == pytest.approx([plain, drawn], rel=1e-6)
        assert row["torch_ppl"] == pytest.approx((plain + drawn) / 2, rel=1e-6)

    assert main([*common, "--seed", "2"]) == 0  # the second seed's export on its own: the same ORT perplexity
    alone = json.loads(capsys.readouterr().out)
    assert "means" not in alone and alone["rows"][0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-6)

    (mean,) = means
    assert mean["seeds"] == [0, 2] and mean["torch_draws"] == 2
    assert mean["ppl"] == pytest.approx((rows[0]["ppl"] + rows[1]["ppl"]) / 2, rel=1e-9)
    assert mean["torch_ppl"] == pytest.approx((rows[0]["torch_ppl"] + rows[1]["torch_ppl"]) / 2, rel=1e-9)
    assert mean["rel_diff"] == pytest.approx(mean["ppl"] / mean["torch_ppl"] - 1, rel=1e-9)
    diffs = [r["ppl"] / r["torch_ppl"] - 1 for r in rows]
    assert mean["rel_diff_mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
    assert mean["rel_diff_stderr"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2, rel=1e-6)
