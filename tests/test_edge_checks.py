"""Issue 25, "elsewhere": every number and file the CLI takes is checked at the edge
(tq_deploy/cli_checks.py, tq_deploy/files.py): one line naming the option, exit status 2, and
nothing the user had replaced by an output."""

from __future__ import annotations

import os

import onnx
import pytest

from tq_deploy.cli import main

from test_cli_errors import error_line  # noqa: E402

def refused(capsys, argv, *fragments) -> str:
    """One error line, exit status 2, from argparse or from the command."""
    try:
        rc = main(list(argv))
    except SystemExit as exit_:
        rc = exit_.code
    return error_line(rc, capsys.readouterr().err, fragments)


@pytest.fixture(scope="module")
def op_model(tmp_path_factory):
    from tq_deploy.export.single_op import make_op_model

    path = tmp_path_factory.mktemp("edge") / "op.onnx"
    onnx.save(make_op_model("TQPagedAttention", head_dim=64, bits=2, num_q_heads=4, num_kv_heads=2), path)
    return path


NUMBERS = [
    (["fuzz", "--timeout", "nan"], ["--timeout", "nan", "finite"]),
    (["fuzz", "--timeout", "0"], ["--timeout", "(0, "]),
    (["soak", "--max-growth", "nan"], ["--max-growth", "nan"]),
    (["soak", "--max-growth", "-0.5"], ["--max-growth", "-0.5"]),
    (["serve", "--idle-seconds", "inf"], ["--idle-seconds", "inf"]),
    (["serve", "--idle-seconds", "1e300"], ["--idle-seconds", "1e300"]),
    (["triton-repo", "out", "--idle-seconds", "1e300"], ["--idle-seconds", "1e300"]),
    (["calibrate", "--out", "p.json", "--ppl-budget", "nan"], ["--ppl-budget", "nan"]),
    (["calibrate", "--out", "p.json", "--ppl-budget", "1", "--head-dim", "-64"], ["--head-dim", "-64", "[2, 1024]"]),
    (["bounds", "--head-dim", "300000"], ["--head-dim", "300000"]),
    (["bounds", "--head-dim", "3e5"], ["--head-dim", "'3e5' is not an int"]),
    (["run", "x.onnx", "--seed", str(2**70)], ["--seed", str(2**70)]),
    (["calibrate", "--out", "p.json", "--ppl-budget", "1", "--seed", "-1"], ["--seed", "-1"]),
    (["calibrate", "--out", "p.json", "--ppl-budget", "1", "--key-mean", "nowhere.txt"],
     ["--key-mean='nowhere.txt'", "expected generated, none"]),
    (["generate", "m.onnx", "--prompt", "a", "--num-blocks", "1e9"], ["--num-blocks", "'1e9' is not an int"]),
    (["triton-repo", "out", "--max-tokens", str(10**12)], ["--max-tokens", str(10**12)]),
    (["triton-repo", "out", "--device", "gpu", "--gpus", "-1"], ["--gpus", "-1"]),
    (["serve", "--num-blocks", str(10**12)], ["--num-blocks", str(10**12)]),
    (["bench", "generate", "--kv-budget-gib", "inf"], ["--kv-budget-gib", "inf"]),
    (["eval-ppl", "--k-bits", "nan"], ["--k-bits", "nan"]),
    (["run", "x.onnx", "--context-lens", "-1"], ["--context-lens", "-1"]),
]


@pytest.mark.parametrize("argv,fragments", NUMBERS, ids=[" ".join(a[:3]) for a, _ in NUMBERS])
def test_numbers_are_finite_and_in_range(capsys, argv, fragments):
    refused(capsys, argv, *fragments)


def test_every_plain_number_option_is_checked():
    """No command keeps a raw int/float type that would take nan, inf or 2**70 unchecked."""
    import argparse
    import importlib

    from tq_deploy.cli import COMMANDS, build_parser, harden

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    unchecked = []

    def walk(p, where):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{where} {name}")
            elif action.type in (int, float):
                unchecked.append(f"{where} {action.option_strings or action.dest}")

    for name, (module, _) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.choices[name])
        harden(sub.choices[name])
        walk(sub.choices[name], name)
    assert not unchecked, unchecked


def test_sizes_are_checked_against_memory(capsys, op_model):
    refused(capsys, ["run", str(op_model), "--context-lens", "100000000"], "--context-lens 100000000 needs about",
            "GiB available")


def test_output_is_not_an_input(capsys, op_model, tmp_path):
    before = op_model.read_bytes()
    refused(capsys, ["run", str(op_model), "--save-outputs", str(op_model)], "--save-outputs", "is the input MODEL")
    assert op_model.read_bytes() == before
    plan = tmp_path / "plan.json"
    plan.write_text('{"format": "tq-deploy-bit-plan", "version": 1, "head_dim": 64, "layers": [[4, 4]]}')
    refused(capsys, ["export", "--plan", str(plan), "--out", str(plan)], "--out", "is the input --plan")
    link = tmp_path / "link.json"
    link.symlink_to(plan)
    refused(capsys, ["export", "--plan", str(plan), "--out", str(link)], "--out", "is the input --plan")
    text = tmp_path / "text.txt"
    text.write_text("some words " * 50)
    refused(capsys, ["calibrate", "--text", str(text), "--out", str(text), "--ppl-budget", "1"], "--out",
            "is the input --text")
    assert text.read_text() == "some words " * 50


def test_output_must_be_a_regular_file_or_new(capsys, tmp_path):
    from tq_deploy import files

    # /dev/null through the function only: a regression run as root through the CLI would replace the
    # machine's device node (it did, once, with the code before this check)
    with pytest.raises(ValueError, match="'/dev/null' is a device, expected a regular file or a new path"):
        files.check_writable("/dev/null", "--out")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(capsys, ["export", "--out", str(fifo)], "--out", "is a FIFO", "expected a regular file or a new path")
    refused(capsys, ["fuzz", "--json", str(fifo)], "--json", "is a FIFO")
    assert not os.path.isfile(fifo)
    refused(capsys, ["export", "--out", str(tmp_path)], "--out", "is a folder")


def test_inputs_that_exist_but_are_not_files_say_what_they_are(capsys, op_model, tmp_path):
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    refused(capsys, ["run", str(fifo)], "is a FIFO, expected an .onnx file")
    refused(capsys, ["run", "/dev/null"], "'/dev/null' is a device")
    refused(capsys, ["run", str(op_model), "--inputs", str(tmp_path)], "--inputs", "is a folder")
    refused(capsys, ["run", str(op_model), "--library", str(tmp_path)], "is a folder")
    refused(capsys, ["export", "--plan", str(tmp_path), "--out", str(tmp_path / "x.onnx")], "--plan", "is a folder")
    message = refused(capsys, ["run", str(tmp_path / "nothing.onnx")], "does not exist")
    assert "folder" not in message


def _plan(path, layers, head_dim=64):
    import json

    path.write_text(json.dumps({"format": "tq-deploy-bit-plan", "version": 1, "head_dim": head_dim,
                                "layers": [{"k_bits": 4, "v_bits": 4}] * layers}))
    return path


def test_plan_files_are_bounded(capsys, tmp_path):
    import time

    start = time.perf_counter()
    refused(capsys, ["export", "--plan", str(_plan(tmp_path / "deep.json", 5000)), "--out", str(tmp_path / "x.onnx")],
            "--plan", "5000 layers, expected at most 1024")
    assert time.perf_counter() - start < 10
    refused(capsys, ["export", "--plan", str(_plan(tmp_path / "wide.json", 2, head_dim=300000)), "--out",
                     str(tmp_path / "x.onnx")], "--plan", "head_dim=300000", "[2, 1024]")
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100000)
    refused(capsys, ["export", "--plan", str(nested), "--out", str(tmp_path / "x.onnx")], "--plan", "is not JSON")
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20))
    refused(capsys, ["export", "--plan", str(big), "--out", str(tmp_path / "x.onnx")], "--plan", "bytes, expected")
    refused(capsys, ["export", "--plan", str(_plan(tmp_path / "p.json", 3)), "--head-dim", "128", "--out",
                     str(tmp_path / "x.onnx")], "--head-dim=128", "expected 64")
    assert not (tmp_path / "x.onnx").exists()


def test_engine_is_checked_even_where_tensorrt_cannot_run(capsys, op_model, tmp_path):
    garbage = tmp_path / "model.engine"
    garbage.write_bytes(os.urandom(4096))
    refused(capsys, ["validate", str(op_model), "--engine", str(garbage)], "--engine", "expected a TensorRT engine")
    refused(capsys, ["validate", str(op_model), "--engine", str(tmp_path)], "--engine", "is a folder")
    short = tmp_path / "short.engine"
    short.write_bytes(b"vtrt")
    refused(capsys, ["validate", str(op_model), "--engine", str(short)], "--engine", "expected a TensorRT engine")


def test_fuzz_refuses_what_it_cannot_run(capsys, tmp_path):
    import torch

    refused(capsys, ["fuzz", "--cases", "1", "--library", "/etc/hostname"], "library='/etc/hostname' does not load")
    refused(capsys, ["fuzz", "--cases", "1", "--library", str(tmp_path)], "is a folder")
    if not torch.cuda.is_available():
        refused(capsys, ["fuzz", "--cases", "1", "--device", "cuda"], "--device cuda", "no CUDA device")


def test_bench_ort_refuses_a_preset_with_widths(capsys):
    refused(capsys, ["bench", "ort", "--kv-preset", "quality", "--k-bits", "3"], "--kv-preset='quality' with --k-bits")


def _with_config(model, text):
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    props = {p.key: p.value for p in copy.metadata_props}
    props["tq_deploy.config"] = text
    del copy.metadata_props[:]
    helper.set_model_props(copy, props)
    return copy


def test_broken_metadata_is_one_line(capsys, op_model, tmp_path):
    import json

    model = onnx.load(op_model)
    config = json.loads({p.key: p.value for p in model.metadata_props}["tq_deploy.config"])
    cases = {
        "nohead": (json.dumps({k: v for k, v in config.items() if k != "head_dim"}), "head_dim=None, expected an int"),
        "strdim": (json.dumps({**config, "head_dim": "64"}), "head_dim='64', expected an int"),
        "nobits": (json.dumps({k: v for k, v in config.items() if k != "k_bits"}), "k_bits=None, expected one of"),
        "list": ("[1, 2]", "expected a JSON object"),
        "notjson": ("{bad", "is not JSON"),
        "badop": (json.dumps({**config, "op": "TQNope"}), "op='TQNope', expected one of"),
    }
    for name, (text, fragment) in cases.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(_with_config(model, text), path)
        for command in (["run", str(path)], ["validate", str(path)]):
            message = refused(capsys, command, "model metadata", fragment)
            assert "KeyError" not in message and "TypeError" not in message


def test_triton_repo_refuses_what_run_refuses(capsys, op_model, tmp_path):
    garbage = tmp_path / "libtq_deploy_ort.so"
    garbage.write_bytes(os.urandom(50000))
    refused(capsys, ["triton-repo", str(tmp_path / "r1"), "--library", str(garbage)], "does not load as the "
            "TurboQuant custom-op library")
    model = onnx.load(op_model)
    for opset in model.opset_import:
        if opset.domain == "turboquant":
            opset.version = 99
    future = tmp_path / "v99.onnx"
    onnx.save(model, future)
    refused(capsys, ["triton-repo", str(tmp_path / "r2"), "--model", str(future)], "opset 'turboquant' version 99")
    refused(capsys, ["run", str(future)], "opset 'turboquant' version 99")
    refused(capsys, ["triton-repo", str(tmp_path / "r3"), "--device", "gpu", "--gpus", "-1"], "--gpus", "-1")
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_a_dangling_name_in_the_graph_is_one_line(capsys, op_model, tmp_path):
    """A node that reads a name nothing provides (a graph input deleted), or nodes out of order: one
    line naming the node and the name, before TensorRT's parser (which prints a dozen lines) or ORT."""
    model = onnx.load(str(op_model))
    missing = model.graph.input[1].name
    del model.graph.input[1]
    onnx.save(model, tmp_path / "missing.onnx")
    for command in (["engine", "--onnx", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "e")],
                    ["run", str(tmp_path / "missing.onnx")]):
        refused(capsys, command, "missing.onnx", repr(missing), "no graph input, initializer or node provides it")
    assert not (tmp_path / "e").exists()

    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["t"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["t"], name="first")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), tmp_path / "order.onnx")
    refused(capsys, ["run", str(tmp_path / "order.onnx")], "'second'", "'t'", "later node 'first'")


def test_serve_checks_the_pool_against_memory_before_tritonserver_starts(capsys, tmp_path):
    """A pool past this machine's memory is one line naming --num-blocks, not a MemoryError in the log."""
    from tq_deploy.serve.server import ServeUnavailableError, bundled_tritonserver

    try:
        bundled_tritonserver()
    except ServeUnavailableError as err:
        pytest.skip(str(err))
    from tq_deploy.export.model import export_model

    export_model(None, tmp_path / "m.onnx")
    line = refused(capsys, ["serve", "--model", str(tmp_path / "m.onnx"), "--num-blocks", "1000000000"],
                   "--num-blocks 1000000000 needs about", "GiB available")
    assert "tritonserver" not in line
