"""An exported LLM whose TurboQuant cache keeps float16 norms (DecoderConfig.norm_dtype, ops.py: TN):
the graph's norm inputs and outputs are float16, ONNX Runtime (CPU EP) runs it as the reference
decoder does, its perplexity equals eval-ppl's ``-n16`` configuration, and the presets that ship it
export it. A tiny random Llama (tests/llama_support.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from llama_support import CodeWatch, block_tables, ort_and_reference_steps, random_checkpoint, session_codes  # noqa: E402,E501

from tq_deploy.export.llm import export_llm  # noqa: E402

OPTIONS = dict(k_bits=5, v_bits=4, block_size=8, seed=2, norm_dtype="float16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = random_checkpoint(folder, "llama", seed=4, head_dim=16, hidden_size=64, num_attention_heads=4)
    return str(folder), hf


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "half.onnx"
    model = export_llm(checkpoint[0], path, **OPTIONS)
    return str(path), model


def test_norms_are_float16_in_the_graph(exported):
    _, model = exported
    values = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    norms = {name: kind for name, kind in values.items() if "_norms" in name}
    assert norms and set(norms.values()) == {onnx.TensorProto.FLOAT16}, norms
    assert values["k_codes.0"] == onnx.TensorProto.UINT8 and values["logits"] == onnx.TensorProto.FLOAT
    from tq_deploy.export.common import read_metadata

    assert read_metadata(model)[1]["norm_dtype"] == "float16"


def test_ort_cpu_matches_the_reference(exported, ort_library, gen):
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.runtime.session import make_session
    from tq_deploy.validate.llm import reference_decoder

    path, _ = exported
    reference = reference_decoder(ExportedModel.load(path))
    assert reference.config.norm_dtype == "float16"
    session = make_session(path, provider="cpu", library=ort_library)
    tables = block_tables(2, 3, 9, gen)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (13, 4)]
    for got, want, _ in ort_and_reference_steps(session, reference, tables, [prompts, [[7], [42]]], 8, 9):
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-4)


def test_perplexity_through_ort_equals_eval_ppl(checkpoint, exported, seed, single_thread):
    from tq_deploy.eval.configs import parse_config
    from tq_deploy.eval.kv_quantizers import build_kv_quantizer
    from tq_deploy.eval.perplexity import perplexity
    from tq_deploy.eval.stepped import stepped_perplexity
    from tq_deploy.runtime.llm_session import LLMSession

    path, _ = exported
    ids = torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(seed))
    session = LLMSession(path, num_blocks=9)
    ort = stepped_perplexity(session, ids, 24, return_logits=True)
    half = CodeWatch(build_kv_quantizer(parse_config("mse-k5v4-n16"), 16, OPTIONS["seed"]))
    torch_path = perplexity(checkpoint[1], ids, half, 24, return_logits=True)
    assert ort.ppl == pytest.approx(torch_path.ppl, rel=1e-3)
    # up to the first token where ORT took the other code at a rounding tie (tests/test_llm_session.py)
    flip = half.first_flip(session_codes(session))
    rows = ids.shape[1] if flip is None else flip
    torch.testing.assert_close(ort.logits[:rows], torch_path.logits[:rows], rtol=1e-3, atol=2e-3)


def test_the_compact_and_small_presets_export_float16_norms(checkpoint, tmp_path):
    from tq_deploy.cli import main
    from tq_deploy.export.common import read_metadata
    from tq_deploy.presets import get_preset

    for name, bits in (("compact", (5, 4)), ("small", (4, 4))):
        preset = get_preset(name)
        assert (preset.k_bits, preset.v_bits, preset.key_mean, preset.norm_dtype) == (*bits, "generated", "float16")
        out = tmp_path / f"{name}.onnx"
        assert main(["export", "--model", checkpoint[0], "--out", str(out), "--kv-preset", name,
                     "--block-size", "8"]) == 0
        _, config = read_metadata(str(out))
        assert (config["k_bits"], config["v_bits"], config["key_mean"], config["norm_dtype"]) == (
            *bits, True, "float16")
    out = tmp_path / "wide.onnx"
    assert main(["export", "--model", checkpoint[0], "--out", str(out), "--kv-preset", "compact",
                 "--norm-dtype", "float32", "--key-mean", "none", "--block-size", "8"]) == 0
    assert read_metadata(str(out))[1]["norm_dtype"] == "float32"


def test_norm_dtype_errors_are_one_line(checkpoint, tmp_path, capsys):
    from tq_deploy.cli import main

    for argv, message in (
        (["--model", checkpoint[0], "--norm-dtype", "bfloat16"], "--norm-dtype: invalid choice: 'bfloat16'"),
        (["--norm-dtype", "float16"], "--norm-dtype='float16' with the synthetic decode model, expected --model"),
    ):
        capsys.readouterr()
        try:
            code = main(["export", *argv, "--out", str(tmp_path / "x.onnx")])
        except SystemExit as exit_:  # argparse's own refusal of a choice
            code = exit_.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in lines[-1], lines
    assert not (tmp_path / "x.onnx").exists()
