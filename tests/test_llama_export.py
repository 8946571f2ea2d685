"""tq-deploy export --model: a Llama-family checkpoint as one ONNX graph with TurboQuant cache nodes.

Small random checkpoints (made here with transformers; nothing is downloaded) are exported and checked:
onnx.checker and the project's shape inference accept the graph; its inputs, outputs, per-layer custom
nodes, rotations and metadata are those of the LLM interface; and ONNX Runtime CPU, with the custom-op
library, computes the PyTorch reference decoder's logits and caches for a prefill of packed sequences
followed by a decode step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers", reason="needs the eval extra: pip install .[eval]")
pytest.importorskip("onnxscript", reason="the exporter needs onnxscript")

from llama_support import block_tables, ort_and_reference_steps, random_checkpoint  # noqa: E402

from tq_deploy import ops  # noqa: E402
from tq_deploy.export.common import read_metadata  # noqa: E402
from tq_deploy.export.llm import export_llm  # noqa: E402
from tq_deploy.export.schemas import infer_shapes, register_schemas  # noqa: E402
from tq_deploy.models.checkpoint import load_decoder  # noqa: E402
from tq_deploy.reference.llama import input_names, output_names  # noqa: E402
from tq_deploy.reference.rotation import make_rotation  # noqa: E402

PLAN = ((4, 3), (8, 4), (2, 5))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-layer random Llama with q/k/v/o biases and a tied LM head, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("llama")
    random_checkpoint(folder, "llama", seed=5, attention_bias=True, tie_word_embeddings=True)
    return str(folder)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    model = export_llm(checkpoint, path, layer_bits=PLAN, block_size=8, seed=11)
    return str(path), model


def test_graph_is_the_llm_interface(exported):
    path, model = exported
    register_schemas()
    onnx.checker.check_model(path, full_check=True)
    inferred = infer_shapes(onnx.load(path))
    _, config = read_metadata(model)
    assert [i.name for i in model.graph.input] == list(input_names(_decoder_config(config)))
    assert [o.name for o in model.graph.output] == list(output_names(_decoder_config(config)))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.input, *inferred.graph.output)}
    assert dims["query_start"] == ["batch+1"] and dims["block_tables"] == ["batch", "max_blocks"]
    assert dims["logits"] == ["logit_rows", 96]
    assert dims["k_codes.1"] == ["num_blocks", 8, 2, ops.packed_size(16, 8)]
    assert dims["v_codes_out.2"] == ["num_blocks", 8, 2, ops.packed_size(16, 5)]
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def _decoder_config(metadata: dict):
    from tq_deploy.export.llm import decoder_config_of

    return decoder_config_of(metadata)


def test_custom_nodes_per_layer(exported):
    """One TQCacheUpdate and one TQPagedPrefill per layer, with that layer's widths and its own rotation
    (seed + layer) under the spec's initializer names."""
    _, model = exported
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert sorted(n.op_type for n in nodes) == ["TQCacheUpdate"] * 3 + ["TQPagedPrefill"] * 3
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        layer = int(n.input[ops.OPS_BY_NAME[n.op_type].input_names().index("rotation")].split(".")[1])
        assert (attrs["k_bits"], attrs["v_bits"]) == PLAN[layer]
        rotation = onnx.numpy_helper.to_array(inits[f"layers.{layer}.rotation"])
        np.testing.assert_array_equal(rotation, make_rotation(16, "haar", 11 + layer).numpy())


def test_metadata(exported, checkpoint):
    _, model = exported
    kind, config = read_metadata(model)
    assert kind == "llm"
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float32"
    assert config["tokenizer"] == checkpoint and config["eos_token_id"] == 2
    assert config["layer_bits"] == [list(p) for p in PLAN]
    assert (config["num_layers"], config["num_q_heads"], config["num_kv_heads"], config["head_dim"]) == (3, 4, 2, 16)
    assert config["block_size"] == 8 and config["seed"] == 11 and config["tie_word_embeddings"]
    assert config["attention_bias"] and config["o_proj_bias"] and config["rope_theta"] == 10000.0


def test_ort_cpu_matches_reference(exported, checkpoint, ort_library, gen):
    """Prefill of two packed prompts (one across a block boundary), then a decode step of both, in ONNX
    Runtime CPU and in the reference decoder: logits and every cache tensor agree."""
    from tq_deploy.runtime.session import make_session

    path, _ = exported
    session = make_session(path, provider="cpu", library=ort_library)
    reference = load_decoder(checkpoint, layer_bits=PLAN, block_size=8, seed=11).model
    num_blocks = 9
    tables = block_tables(2, 3, num_blocks, gen)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (11, 5)]
    for got, want, names in ort_and_reference_steps(session, reference, tables, [prompts, [[7], [42]]], 8,
                                                    num_blocks):
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-4)
        for name, a, b in zip(names[7:], got[1:], want[1:]):
            if "codes" in name:
                assert (a != b.numpy()).mean() < 1e-3, name  # a rounding tie may flip a rare code
            else:
                np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_float16_and_external_data(checkpoint, tmp_path):
    """fp16 weights (rotations and codebooks stay fp32, logits come out fp32), weights in <out>.data."""
    path = tmp_path / "half.onnx"
    export_llm(checkpoint, path, k_bits=3, v_bits=3, dtype="float16", external_data=True)
    assert (tmp_path / "half.onnx.data").is_file()
    bare = onnx.load(str(path), load_external_data=False)
    outside = {t.name for t in bare.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {"embed_tokens.weight", "layers.0.self_attn.q_proj.weight"} <= outside
    source = str(Path(ops.__file__).parent)
    assert source not in path.read_bytes().decode("latin-1"), "the exporting machine's paths are in the model"
    assert path.stat().st_size < 64 * 1024
    register_schemas()
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["embed_tokens.weight"] == onnx.TensorProto.FLOAT16
    assert types["layers.0.rotation"] == types["layers.0.k_codebook"] == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_metadata(model)[1]["dtype"] == "float16"


def test_qwen2_biases_exported(tmp_path):
    random_checkpoint(tmp_path / "qwen", "qwen2", num_hidden_layers=1)
    model = export_llm(str(tmp_path / "qwen"), block_size=4)
    _, config = read_metadata(model)
    assert config["architecture"] == "Qwen2ForCausalLM" and config["attention_bias"] and not config["o_proj_bias"]
    names = {t.name for t in model.graph.initializer}
    assert {"layers.0.self_attn.q_proj.bias", "layers.0.self_attn.v_proj.bias"} <= names
    assert "layers.0.self_attn.o_proj.bias" not in names


def cli(capsys, *args) -> tuple[int, str, str]:
    """``tq-deploy export ARGS`` in this process: (exit status, stdout, stderr)."""
    from tq_deploy.cli import main

    capsys.readouterr()
    code = main(["export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def bad_input_cases(checkpoint, tmp_path):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    window = tmp_path / "mistral"
    window.mkdir()
    (window / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                                    "sliding_window": 4096}))
    plans = {}
    for name, layers, dim in (("layers", 2, 16), ("dim", 3, 64)):
        plans[name] = tmp_path / f"{name}.json"
        plans[name].write_text(json.dumps({"format": "tq-deploy-bit-plan", "version": 1, "head_dim": dim,
                                           "layers": [{"k_bits": 4, "v_bits": 4}] * layers}))
    return [
        (["--model", str(other)], "is a GPT2LMHeadModel, expected a Llama-family causal LM: LlamaForCausalLM"),
        (["--model", str(window)], "sliding_window=4096, expected null"),
        (["--model", checkpoint, "--kv-preset", "fast"], "--kv-preset='fast', expected one of quality, balanced"),
        (["--model", checkpoint, "--plan", str(plans["layers"])], "--plan has 2 layers, expected 3"),
        (["--model", checkpoint, "--plan", str(plans["dim"])], "--plan was calibrated for head_dim=64, expected 16"),
        (["--model", checkpoint, "--num-q-heads", "8"], "with --num-q-heads, expected none of them"),
        (["--model", str(tmp_path / "missing")], "does not exist, expected a transformers model folder"),
    ]


def test_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    for args, message in bad_input_cases(checkpoint, tmp_path):
        code, _, err = cli(capsys, *args, "--out", str(tmp_path / "x.onnx"))
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tq-deploy export: error: "), (args, err)
        assert message in lines[0], (args, lines[0])
    assert not (tmp_path / "x.onnx").exists()


def test_cli_writes_the_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = cli(capsys, "--model", checkpoint, "--kv-preset", "balanced", "--block-size", "4",
                            "--out", str(out))
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: llm LlamaForCausalLM (3 layers, k6v4, float32, block 4)")
    kind, config = read_metadata(str(out))
    assert kind == "llm" and (config["k_bits"], config["v_bits"], config["block_size"]) == (6, 4, 4)
