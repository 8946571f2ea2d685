"""`tq-deploy serve` for real: the bundled tritonserver, driven over HTTP and gRPC by tritonclient.

One server (started with the CLI, stopped with SIGTERM) serves the module: 8 concurrent sequences
of different lengths per protocol, every step compared with the PyTorch reference run of the same
sequence; their blocks return to the pool; unknown sequences, malformed tensors and a full pool
get a clear error while the other sequences go on unharmed. Skipped (with the reason) only where
the server or the client is not installed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from serve_support import CONFIG, TOLERANCE, ServeProcess, assert_matches_reference, exported_model, free_ports, \
    fresh_seed, pool_gauges, tritonserver_or_skip

H = CONFIG.hidden_size
B = CONFIG.block_size
POOL_BLOCKS = 16
LENGTHS = [1, 2, 7, 8, 9, 16, 17, 30]  # 1+1+1+1+2+2+3+4 = 15 blocks of 8 tokens


def _requirements():
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    tritonserver_or_skip()
    return httpclient, grpcclient


class CliServer(ServeProcess):
    """``tq-deploy serve`` of the decode model in a subprocess."""

    def __init__(self, *extra: str, log=None):
        self.http, self.grpc, self.metrics = free_ports(3)
        args = [sys.executable, "-m", "tq_deploy.cli", "serve", "--model", exported_model(), "--host", "127.0.0.1",
                "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
                *extra]
        if log:
            args += ["--log", str(log)]
        super().__init__(args)

    def stop(self, signum) -> int:
        self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self._reader.join(5)
        return status

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _requirements()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # A queue delay of a few ms lets concurrent sequences meet in one step even on a busy CI machine.
    cli = CliServer("--num-blocks", str(POOL_BLOCKS), "--threads", "1", "--max-batch", "8",
                    "--queue-delay-us", "3000", log=log)
    cli.wait_ready()
    yield cli
    status = cli.stop(signal.SIGTERM)
    assert status == 0, "\n".join(cli.lines)
    assert "exit status 0" in cli.lines[-1], log.read_text()[-3000:]
    assert any("SIGTERM: stopping" in line for line in cli.lines), cli.lines
    assert "stopped (tritonserver exit status 0)" in cli.lines[-1], cli.lines


def _inputs(module, hidden: np.ndarray, position: int):
    x = module.InferInput("hidden", [1, H], "FP32")
    x.set_data_from_numpy(hidden.reshape(1, H).astype(np.float32))
    p = module.InferInput("positions", [1, 1], "INT64")
    p.set_data_from_numpy(np.array([[position]], np.int64))
    return [x, p]


def _hiddens(rng, count: int) -> list[np.ndarray]:
    return [rng.standard_normal(H).astype(np.float32) for _ in range(count)]


def _statistics(server) -> tuple[int, int]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    try:
        stats = client.get_inference_statistics("tq_decode")["model_stats"][0]
    finally:
        client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


def _drive_concurrently(server, protocol: str, first_id: int, seed: int) -> None:
    httpclient, grpcclient = _requirements()
    module = httpclient if protocol == "http" else grpcclient
    url = f"127.0.0.1:{server.http if protocol == 'http' else server.grpc}"
    rng = np.random.default_rng(seed)
    hiddens = {first_id + k: _hiddens(rng, n) for k, n in enumerate(LENGTHS)}
    outputs = {sid: [] for sid in hiddens}
    failures = []
    before = _statistics(server)

    def run(sid):
        client = module.InferenceServerClient(url)
        try:
            steps = hiddens[sid]
            for t, h in enumerate(steps):
                result = client.infer("tq_decode", _inputs(module, h, t), sequence_id=sid,
                                      sequence_start=t == 0, sequence_end=t == len(steps) - 1)
                outputs[sid].append(result.as_numpy("out").reshape(H))
        except Exception as err:  # noqa: BLE001 - reported by the test below
            failures.append(f"sequence {sid}: {err}")
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(sid,)) for sid in hiddens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    for sid, steps in hiddens.items():
        assert_matches_reference(outputs[sid], steps, f"{protocol} sequence {sid}")
    inferences, executions = (a - b for a, b in zip(_statistics(server), before))
    assert inferences == sum(LENGTHS)
    # concurrent sequences shared decode steps: fewer model runs than tokens
    assert executions < inferences, (executions, inferences)
    assert pool_gauges(server.metrics_url) == {"free": POOL_BLOCKS, "total": POOL_BLOCKS, "sequences": 0}


def test_eight_sequences_over_http(server):
    _drive_concurrently(server, "http", first_id=100, seed=fresh_seed())


def test_eight_sequences_over_grpc(server):
    _drive_concurrently(server, "grpc", first_id=200, seed=fresh_seed())


def test_bad_requests_get_clear_errors_and_spare_the_others(server):
    httpclient, _ = _requirements()
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(fresh_seed())
    steps = _hiddens(rng, 12)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", concurrency=4)

    def bad_inputs(kind: str, position: int):
        if kind == "wide":
            x = httpclient.InferInput("hidden", [1, H + 1], "FP32")
            x.set_data_from_numpy(np.zeros((1, H + 1), np.float32))
            return [x, _inputs(httpclient, steps[0], position)[1]]
        if kind == "float64":
            x = httpclient.InferInput("hidden", [1, H], "FP64")
            x.set_data_from_numpy(np.zeros((1, H)))
            return [x, _inputs(httpclient, steps[0], position)[1]]
        if kind == "no positions":
            return _inputs(httpclient, steps[0], position)[:1]
        return _inputs(httpclient, np.full(H, np.nan) if kind == "nan" else steps[0], position)

    # (what, sequence id, flags, expected words in the error) next to each good step of sequence 7
    bad = [
        ("unknown", 31, {}, "must specify the START flag"),
        ("nan", 7, {}, "non-finite"),
        ("gap", 7, {}, "expected"),
        ("wide", 7, {}, "unexpected shape"),
        ("float64", 7, {}, "FP64"),
        ("no positions", 7, {}, "positions"),
        ("nan", 32, {"sequence_start": True}, "non-finite"),
        ("after refused start", 32, {}, "sequence_id=32 is not active"),
    ]
    outs = []
    try:
        for t, h in enumerate(steps):
            good = client.async_infer("tq_decode", _inputs(httpclient, h, t), sequence_id=7, sequence_start=t == 0,
                                      sequence_end=t == len(steps) - 1)
            if 0 < t <= len(bad):
                what, sid, flags, words = bad[t - 1]
                position = t + 5 if what == "gap" else (t if sid == 7 else 0)
                with pytest.raises(InferenceServerException) as err:
                    client.infer("tq_decode", bad_inputs(what, position), sequence_id=sid, **flags)
                assert words in err.value.message(), (what, err.value.message())
                assert "Traceback" not in err.value.message()
            outs.append(good.get_result().as_numpy("out").reshape(H))
        # tritonserver still holds sequence 32 open (only the model refused its start); its END closes it
        with pytest.raises(InferenceServerException, match="sequence_id=32 is not active"):
            client.infer("tq_decode", _inputs(httpclient, steps[0], 1), sequence_id=32, sequence_end=True)
    finally:
        client.close()
    assert_matches_reference(outs, steps)
    assert pool_gauges(server.metrics_url) == {"free": POOL_BLOCKS, "total": POOL_BLOCKS, "sequences": 0}


def test_full_pool_refuses_a_new_sequence_and_recovers(server):
    _, grpcclient = _requirements()
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(fresh_seed())
    ids = list(range(300, 300 + POOL_BLOCKS))  # one block each fills the pool
    steps = {sid: _hiddens(rng, 2) for sid in ids}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    outs = {sid: [] for sid in ids}
    try:
        for sid in ids:
            result = client.infer("tq_decode", _inputs(grpcclient, steps[sid][0], 0), sequence_id=sid, sequence_start=True)
            outs[sid].append(result.as_numpy("out").reshape(H))
        assert pool_gauges(server.metrics_url) == {"free": 0, "total": POOL_BLOCKS, "sequences": POOL_BLOCKS}
        with pytest.raises(InferenceServerException) as err:
            client.infer("tq_decode", _inputs(grpcclient, steps[ids[0]][0], 0), sequence_id=999, sequence_start=True)
        assert "KV-cache pool full" in err.value.message() and f"0 of {POOL_BLOCKS} blocks are free" in err.value.message()
        assert "UNAVAILABLE" in str(err.value.status())
        # every held sequence is intact: its next token (same block) matches the reference
        for sid in ids:
            result = client.infer("tq_decode", _inputs(grpcclient, steps[sid][1], 1), sequence_id=sid, sequence_end=True)
            outs[sid].append(result.as_numpy("out").reshape(H))
        assert pool_gauges(server.metrics_url)["free"] == POOL_BLOCKS
        # with the pool free again, the refused id can start afresh
        result = client.infer("tq_decode", _inputs(grpcclient, steps[ids[0]][0], 0), sequence_id=999,
                              sequence_start=True, sequence_end=True)
        np.testing.assert_allclose(result.as_numpy("out").reshape(H), outs[ids[0]][0], **TOLERANCE)
    finally:
        client.close()
    for sid in ids:
        assert_matches_reference(outs[sid], steps[sid], f"sequence {sid}")
    assert pool_gauges(server.metrics_url) == {"free": POOL_BLOCKS, "total": POOL_BLOCKS, "sequences": 0}


def test_sigint_stops_the_server_cleanly(tmp_path):
    _requirements()
    log = tmp_path / "server.log"
    cli = CliServer("--num-blocks", "4", "--threads", "1", log=log)
    cli.wait_ready()
    ready = next(line for line in cli.lines if "ready:" in line)
    assert f"http 127.0.0.1:{cli.http}" in ready and "pool 4 blocks x 8 tokens" in ready
    assert cli.stop(signal.SIGINT) == 0, cli.lines
    assert any("SIGINT: stopping" in line for line in cli.lines)
    assert "stopped (tritonserver exit status 0)" in cli.lines[-1]
    assert "successfully loaded 'tq_decode'" in log.read_text()
    # nothing listens on its ports any more: the server process is gone
    for port in (cli.http, cli.grpc, cli.metrics):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port


def test_serve_refuses_bad_arguments(tmp_path, capsys):
    from tq_deploy.cli import main

    _requirements()
    assert main(["serve", "--model", str(tmp_path / "missing.onnx"), "--http-port", "18931",
                 "--grpc-port", "18932", "--metrics-port", "18933"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["serve", "--model", exported_model(), "--max-batch", "64", "--max-sequences", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tq-deploy serve: error: --max-sequences 8, expected >= --max-batch 64"
