"""The key mean of an exported LLM (DecoderConfig.key_mean, tq_deploy/models/key_mean.py): calibrated on
the model's own samples or a text, stored as one initializer per layer, applied by the attention ops.

A tiny random Llama (tests/llama_support.py): its calibration and export take seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from llama_support import block_tables, ort_and_reference_steps, random_checkpoint  # noqa: E402

from tq_deploy.export.llm import export_llm  # noqa: E402
from tq_deploy.models.checkpoint import load_decoder  # noqa: E402
from tq_deploy.models.key_mean import calibration_tokens, measure_key_mean, set_key_mean  # noqa: E402
from tq_deploy.reference.llama import allocate_caches, step_inputs  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    random_checkpoint(folder, "llama", seed=3, attention_bias=True)
    return str(folder)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "mean.onnx"
    model = export_llm(checkpoint, path, k_bits=4, v_bits=3, block_size=8, seed=2, key_mean="generated")
    return str(path), model


def test_the_mean_is_the_mean_of_transformers_own_keys_before_rope(checkpoint):
    """measure_key_mean against k_proj's outputs in transformers' own forward over the same texts."""
    import transformers

    loaded = load_decoder(checkpoint, key_mean=True, block_size=8)
    texts = calibration_tokens(loaded.model, "generated", first_token=1, tokens=96)
    assert len(texts) == 8 and all(len(t) == 12 for t in texts)
    means = measure_key_mean(loaded.model, texts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    seen = {i: [] for i in range(len(hf.model.layers))}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out, i=i: seen[i].append(out[0]))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for text in texts:
            hf(torch.tensor([text]))
    for hook in hooks:
        hook.remove()
    cfg = loaded.config
    for i, mean in enumerate(means):
        expected = torch.cat(seen[i]).reshape(-1, cfg.num_kv_heads, cfg.head_dim).mean(0)
        torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-5)
        assert float(mean.abs().max()) > 0.05  # biases and wide weights: a mean far from zero


def test_a_zero_mean_changes_nothing(checkpoint, gen):
    plain = load_decoder(checkpoint, k_bits=4, v_bits=3, block_size=8, seed=2).model
    zero = load_decoder(checkpoint, k_bits=4, v_bits=3, block_size=8, seed=2, key_mean=True).model
    tables = block_tables(2, 2, 4, gen)
    inputs = step_inputs([list(range(3, 14)), [5, 9]], [0, 0], tables, 8)
    with torch.no_grad():
        a, *_ = plain(*inputs.values(), *allocate_caches(plain.config, 4))
        b, *_ = zero(*inputs.values(), *allocate_caches(zero.config, 4))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_cache_holds_keys_without_the_turned_mean(checkpoint):
    """Position 0's key is stored as it is, the others as k_t - R_t mu: decoded and with R_t mu added back,
    every key is the plain decoder's key to quantization error, and the key-mean decoder's error is lower
    on keys with a large common part."""
    from tq_deploy.reference.paged import rope_turned
    from tq_deploy.reference.quantizer import decode_reference

    plain = load_decoder(checkpoint, k_bits=4, v_bits=3, block_size=8, seed=2, cache="float32").model
    mean = load_decoder(checkpoint, k_bits=4, v_bits=3, block_size=8, seed=2, key_mean=True).model
    mu = [torch.randn(mean.config.num_kv_heads, mean.config.head_dim) * 2 for _ in mean.layers]
    set_key_mean(mean, mu)
    tokens = list(range(3, 20))
    tables = torch.arange(3, dtype=torch.int32)[None]
    inputs = step_inputs([tokens], [0], tables, 8)
    with torch.no_grad():
        _, *float_caches = plain(*inputs.values(), *allocate_caches(plain.config, 3))
        _, *caches = mean(*inputs.values(), *allocate_caches(mean.config, 3))
    attn = mean.layers[0].self_attn
    keys = decode_reference(caches[0], caches[1], attn.rotation, attn.k_codebook, attn.k_bits).reshape(
        24, mean.config.num_kv_heads, -1)[:len(tokens)]
    positions = torch.arange(len(tokens))
    turned = rope_turned(mu[0], mean.inv_freq, positions) * (positions > 0)[:, None, None]
    true_keys = float_caches[0].reshape(24, mean.config.num_kv_heads, -1)[:len(tokens)]
    stored = true_keys - turned  # what the cache must hold: k_0, then k_t - R_t mu
    error = (keys - stored).norm(dim=-1) / stored.norm(dim=-1)
    assert float(error.max()) < 0.25, error  # 4-bit codes of 16-dim vectors: about 0.1 relative error
    off = (keys - true_keys).norm(dim=-1) / stored.norm(dim=-1)  # the same codes read as plain keys
    assert float(off[0].max()) < 0.25 and float(off[1:].min()) > 0.5, off


def test_ort_cpu_matches_the_reference(exported, ort_library, gen):
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.runtime.session import make_session
    from tq_deploy.validate.llm import reference_decoder

    path, model = exported
    prefill = [n for n in model.graph.node if n.op_type == "TQPagedPrefill"]
    assert len(prefill) == 3 and all(list(n.input)[-1] == "inv_freq" and "key_mean" in n.input[-2] for n in prefill)
    reference = reference_decoder(ExportedModel.load(path))
    assert reference.config.key_mean and float(reference.layers[1].self_attn.key_mean.abs().max()) > 0.05
    session = make_session(path, provider="cpu", library=ort_library)
    tables = block_tables(2, 3, 9, gen)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (13, 4)]
    for got, want, _ in ort_and_reference_steps(session, reference, tables, [prompts, [[7], [42]]], 8, 9):
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-4)


def test_metadata_and_the_compact_preset(checkpoint, exported, tmp_path):
    from tq_deploy.export.common import read_metadata
    from tq_deploy.presets import get_preset

    _, config = read_metadata(exported[1])
    assert config["key_mean"] is True and config["key_mean_calibration"] == "generated"
    compact = get_preset("compact")
    assert (compact.k_bits, compact.v_bits, compact.key_mean, compact.norm_dtype) == (5, 4, "generated", "float16")
    assert compact.config_name == "mse-k5v4-n16-kpc1@generated"


def test_cli_key_mean_source_and_its_errors(checkpoint, tmp_path, capsys):
    from tq_deploy.cli import main
    from tq_deploy.export.common import read_metadata

    out = tmp_path / "plain.onnx"
    assert main(["export", "--model", checkpoint, "--out", str(out), "--kv-preset", "compact",
                 "--key-mean", "none", "--block-size", "8"]) == 0
    _, config = read_metadata(str(out))
    assert config["key_mean"] is False and (config["k_bits"], config["v_bits"]) == (5, 4)
    for argv, message in (
        (["--model", checkpoint, "--key-mean", "nowhere.txt"],
         "--key-mean='nowhere.txt', expected generated, none, a shipped text (austen, darwin) or a text file"),
        (["--key-mean", "generated"], "--key-mean='generated' with the synthetic decode model, expected --model"),
    ):
        capsys.readouterr()
        code = main(["export", *argv, "--out", str(tmp_path / "x.onnx")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tq-deploy export: error: "), lines
        assert message in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_a_plan_carries_its_key_mean_into_the_export(checkpoint, tmp_path):
    """`tq-deploy calibrate --key-mean` writes the source into the plan; `export --plan` calibrates that key
    mean unless --key-mean says otherwise."""
    from tq_deploy.cli import main
    from tq_deploy.export.common import read_metadata
    from tq_deploy.presets import BitPlan, write_plan

    plan = tmp_path / "plan.json"
    write_plan(plan, BitPlan(((5, 4), (4, 3), (4, 4)), 16, {"name": "tiny"}, key_mean="generated"))
    for extra, expected in (([], True), (["--key-mean", "none"], False)):
        out = tmp_path / f"plan{len(extra)}.onnx"
        assert main(["export", "--model", checkpoint, "--plan", str(plan), "--block-size", "8", "--out", str(out),
                     *extra]) == 0
        _, config = read_metadata(str(out))
        assert config["key_mean"] is expected
        assert [tuple(p) for p in config["layer_bits"]] == [(5, 4), (4, 3), (4, 4)]
        assert config.get("key_mean_calibration") == ("generated" if expected else None)
