"""`tq-deploy triton-repo`: the generated tritonserver model repository.

The configs are parsed against tritonserver's own model_config.proto (from tritonclient) and loaded
by the real tritonserver (the one bundled with nvidia-pytriton, which has no onnxruntime or
tensorrt backend: it must get past its config checks and stop only at the missing backend). The
serving model is run in ONNX Runtime the way tritonserver's implicit state drives it (each sequence's
state fed back, batched with other sequences, starting from zeros) and compared with the PyTorch
reference run of each sequence.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
from serve_support import CONFIG, TOLERANCE, exported_model, fresh_seed, library_or_skip, reference_on_codes

from tq_deploy.serve.repository import CACHE_NAMES, write_repository

H = CONFIG.hidden_size
B = CONFIG.block_size
MAX_TOKENS = 3 * B - 5  # rounded up to 3 blocks


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    library_or_skip()
    out = tmp_path_factory.mktemp("repo") / "tq"
    return out, write_repository(out, exported_model(), max_tokens=MAX_TOKENS, max_batch=4, server_path="/models")


def _parse(path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_configs_parse_and_pair_the_model_states(repo):
    out, info = repo
    serving = onnx.load(out / "onnxruntime" / "tq_decode" / "1" / "model.onnx")
    graph_inputs = {i.name: i.type.tensor_type for i in serving.graph.input}
    graph_outputs = {o.name: o.type.tensor_type for o in serving.graph.output}
    assert sorted(graph_inputs) == sorted(["hidden", "positions", *(n + "_state" for n in CACHE_NAMES)])
    assert sorted(graph_outputs) == sorted(["out", *(n + "_state_out" for n in CACHE_NAMES)])
    triton_type = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}
    for backend in ("onnxruntime", "tensorrt"):
        config = _parse(out / backend / "tq_decode" / "config.pbtxt")
        from tritonclient.grpc import model_config_pb2 as pb

        assert config.backend == backend and config.max_batch_size == 4
        assert [(i.name, list(i.dims)) for i in config.input] == [("hidden", [H]), ("positions", [1])]
        assert config.input[1].HasField("reshape") and list(config.input[1].reshape.shape) == []
        assert [(o.name, list(o.dims)) for o in config.output] == [("out", [H])]
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
        assert config.sequence_batching.HasField("oldest")
        states = config.sequence_batching.state
        assert len(states) == 4
        for state in states:
            # every state is a graph input paired with its graph output, shapes without the batch axis
            dims = [d.dim_value for d in graph_inputs[state.input_name].shape.dim][1:]
            assert state.output_name == state.input_name + "_out" and state.output_name in graph_outputs
            assert list(state.dims) == dims and dims[0] == 3
            expected = triton_type[graph_inputs[state.input_name].elem_type]
            if backend == "tensorrt" and expected == "TYPE_UINT8":
                expected = "TYPE_INT8"  # TensorRT engines carry the codes as int8
            assert pb.DataType.Name(state.data_type) == expected
            assert [list(s.dims) for s in state.initial_state] == [list(state.dims)]
            assert state.initial_state[0].zero_data
    ort = _parse(out / "onnxruntime" / "tq_decode" / "config.pbtxt")
    assert list(ort.model_operations.op_library_filename) == ["/models/lib/libtq_deploy_ort.so"]
    from tq_deploy.runtime.library import locate

    assert (out / "lib" / "libtq_deploy_ort.so").read_bytes() == open(locate("ort"), "rb").read()
    trt = _parse(out / "tensorrt" / "tq_decode" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and trt.default_model_filename == "model.plan"
    readme = (out / "README.md").read_text()
    assert f"API version {info.ort_api_version}" in readme and f"1.{info.ort_api_version} or newer" in readme
    assert "tritonserver --model-repository=/models/onnxruntime" in readme
    assert "LD_PRELOAD=" in readme and "--backend-config=tensorrt,plugins=" in readme
    assert f"at most {3 * B} tokens per sequence" in readme


def test_gpu_instances(tmp_path):
    library_or_skip()
    write_repository(tmp_path / "r", exported_model(), device="gpu", gpus=[0, 1], instances=2)
    config = _parse(tmp_path / "r" / "onnxruntime" / "tq_decode" / "config.pbtxt")
    from tritonclient.grpc import model_config_pb2 as pb

    group = config.instance_group[0]
    assert group.kind == pb.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 1] and group.count == 2
    assert config.model_operations.op_library_filename[0] == str((tmp_path / "r").resolve() / "lib" / "libtq_deploy_ort.so")


def test_serving_model_as_triton_drives_it_matches_reference(repo):
    """Sequences start at different steps, so a batch mixes fresh (zero) states with running
    ones; each step's states go back in as the next step's, as tritonserver's implicit state does."""
    from tq_deploy.runtime.session import make_session

    out, info = repo
    session = make_session(str(out / "onnxruntime" / "tq_decode" / "1" / "model.onnx"), threads=1)
    state_shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim][1:]
                    for i in onnx.load(out / "onnxruntime" / "tq_decode" / "1" / "model.onnx").graph.input
                    if i.name.endswith("_state")}
    dtypes = {n: np.uint8 if "codes" in n else np.float32 for n in state_shapes}
    rng = np.random.default_rng(fresh_seed())
    # (first step, tokens): up to the per-sequence capacity of 3 blocks
    plan = {1: (0, 3 * B), 2: (2, B + 1), 3: (5, 1), 4: (5, 2 * B)}
    hiddens = {sid: [rng.standard_normal(H).astype(np.float32) for _ in range(n)] for sid, (_, n) in plan.items()}
    states = {sid: {n: np.zeros(s, dtypes[n]) for n, s in state_shapes.items()} for sid in plan}
    got = {sid: [] for sid in plan}
    for step in range(max(a + n for a, n in plan.values())):
        batch = [sid for sid, (a, n) in plan.items() if a <= step < a + n]
        rng.shuffle(batch)  # the batcher's row order is arbitrary
        feeds = {"hidden": np.stack([hiddens[s][step - plan[s][0]] for s in batch]),
                 "positions": np.array([step - plan[s][0] for s in batch], np.int64)}
        for name in state_shapes:
            feeds[name] = np.stack([states[s][name] for s in batch])
        result = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for row, sid in enumerate(batch):
            for name in state_shapes:
                states[sid][name] = result[name + "_out"][row]
            t = step - plan[sid][0]
            after = {name.removesuffix("_state"): states[sid][name] for name in state_shapes}
            want = reference_on_codes(hiddens[sid][t], t, after)
            np.testing.assert_allclose(result["out"][row], want, err_msg=f"sequence {sid} token {t}", **TOLERANCE)
            got[sid].append(result["out"][row])
    assert {sid: len(outs) for sid, outs in got.items()} == {sid: n for sid, (_, n) in plan.items()}


def test_positions_past_capacity_touch_no_state(repo):
    from tq_deploy.runtime.session import make_session

    out, _ = repo
    path = out / "onnxruntime" / "tq_decode" / "1" / "model.onnx"
    session = make_session(str(path), threads=1)
    rng = np.random.default_rng(fresh_seed())
    feeds = {"hidden": rng.standard_normal((3, H)).astype(np.float32),
             "positions": np.array([3 * B, 1, -1], np.int64)}
    for i in onnx.load(path).graph.input:
        if i.name.endswith("_state"):
            shape = [3] + [d.dim_value for d in i.type.tensor_type.shape.dim][1:]
            dtype = np.uint8 if "codes" in i.name else np.float32
            feeds[i.name] = (rng.integers(0, 255, shape) if dtype == np.uint8 else rng.random(shape)).astype(dtype)
    result = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for name in ("k_norms_state", "v_codes_state"):
        after = result[name + "_out"]
        np.testing.assert_array_equal(after[0], feeds[name][0])  # past the end: not written
        np.testing.assert_array_equal(after[2], feeds[name][2])  # negative: not written
        assert not np.array_equal(after[1, 0, 1], feeds[name][1, 0, 1])  # position 1 was written
        changed = np.argwhere(np.any(after[1] != feeds[name][1], axis=tuple(range(2, after.ndim - 1))))
        assert changed.tolist() == [[0, 1]]  # and nothing else of that sequence
    assert np.all(np.isfinite(result["out"]))


def _tritonserver_load(repository) -> str:
    """The bundled tritonserver's log of loading ``repository`` (it has no onnxruntime or tensorrt
    backend, so it exits after its checks)."""
    from tq_deploy.serve.server import ServeUnavailableError, Tritonserver, bundled_tritonserver, libpython_dir

    try:
        installed = bundled_tritonserver()
        env = Tritonserver._environment(installed, libpython_dir())
    except ServeUnavailableError as err:
        pytest.skip(str(err))
    backends = repository.parent / "no_backends"
    backends.mkdir(exist_ok=True)
    result = subprocess.run([str(installed.binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                             "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false",
                             "--disable-auto-complete-config", "--exit-timeout-secs=1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    return result.stdout + result.stderr


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_tritonserver_checks_pass_up_to_the_missing_backend(repo, backend, tmp_path):
    out, _ = repo
    log = _tritonserver_load(out / backend)
    assert f"unable to find backend library for backend '{backend}'" in log, log[-3000:]
    assert "Poll failed" not in log
    if backend == "tensorrt":
        return
    # the same check does fail a broken config: the positions reshape no longer fits its dims
    broken = tmp_path / "broken"
    (broken / "tq_decode" / "1").mkdir(parents=True)
    text = (out / backend / "tq_decode" / "config.pbtxt").read_text()
    (broken / "tq_decode" / "config.pbtxt").write_text(text.replace("shape: [  ]", "shape: [ 2 ]", 1))
    log = _tritonserver_load(broken)
    assert "Poll failed" in log and "different size for dims and reshape" in log, log[-3000:]


def test_cli_writes_a_repository_and_refuses_bad_arguments(tmp_path, capsys):
    from tq_deploy.cli import main

    library_or_skip()
    out = tmp_path / "r"
    assert main(["triton-repo", str(out), "--model", exported_model(), "--max-tokens", "20", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["blocks_per_sequence"] == 3 and summary["max_tokens"] == 24
    assert summary["op_library"] == str(out.resolve() / "lib" / "libtq_deploy_ort.so")
    cases = {
        ("--model", exported_model()): f"OUT {str(out)!r} is not empty, expected a new or empty folder (or --force)",
        ("--model", exported_model(), "--force", "--gpus", "0"): "--gpus [0] with --device cpu, expected --device gpu",
        ("--model", exported_model(), "--force", "--max-batch", "0"): "--max-batch 0, expected >= 1",
        ("--model", exported_model(), "--force", "--server-path", "models"):
            "--server-path 'models', expected an absolute path",
        ("--model", str(tmp_path / "none.onnx"), "--force"): f"model {str(tmp_path / 'none.onnx')!r} does not exist",
    }
    for extra, message in cases.items():
        assert main(["triton-repo", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tq-deploy triton-repo: error: ") and message in err and "\n" not in err, err
