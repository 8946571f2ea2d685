"""Load on tq-deploy serve: token streams of the LLM, or decode steps/s of the synthetic decode step.

    tq-deploy bench serve --model smollm2.onnx     # the LLM: TTFT, inter-token latency, tokens/s (serve_llm.py)
    tq-deploy bench serve                          # start a server here (CPU EP), 1, 8 and 32 sequences
    tq-deploy bench serve --provider cuda          # the same with the CUDA EP (a GPU and onnxruntime-gpu)
    tq-deploy bench serve --url 127.0.0.1:8001     # a server already running (gRPC; --protocol http for 8000)

Each of N client threads (tritonclient, one connection each) runs sequences back to back: a
sequence is --tokens requests, one token each, the first with sequence_start and the last with
sequence_end, every request sent when the previous answer arrived. After --warmup seconds the
requests finishing within the next --seconds are counted: steps/s is their number per second
(tokens decoded per second over all sequences), latency is per request as the client sees it.
"mean batch" is the server's tokens per model run over the same time (tritonserver's statistics).
Without --url the server is started here with the given model (default: the default exported
decode model), and client and server share this machine's CPUs.
"""

from __future__ import annotations

import os
import platform
import tempfile
import threading
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--url", help="host:port of a running tq-deploy serve (default: start one here)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="client protocol (default grpc)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                   help="concurrent sequences, one table row each (default 1 8 32)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each row (default 2)")
    p.add_argument("--model", help="decode model for the server started here (default: export the default one)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="server's execution provider")
    p.add_argument("--threads", type=int, help="server's ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--num-blocks", type=int, help="server's pool (default: enough for every sequence)")
    p.add_argument("--max-batch", type=int, default=32, help="server's sequences per step (default 32)")
    p.add_argument("--queue-delay-us", type=int, default=500, help="server's batching delay (default 500)")
    p.add_argument("--seed", type=int, default=0)
    # the LLM server (a --model that is an LLM or a checkpoint, or an http:// --url): tq_deploy/bench/serve_llm.py
    p.add_argument("--max-tokens", type=int, default=64, help="LLM: new tokens per request (default 64)")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[16, 256], metavar=("LOW", "HIGH"),
                   help="LLM: prompt lengths in words of the shipped texts (default 16 256)")
    p.add_argument("--kv-memory", type=float, default=1.0, help="LLM: the server's KV pool in GiB (default 1)")


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _statistics(module, url: str) -> tuple[int, int]:
    client = module.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("tq_decode")
        if not isinstance(stats, dict):  # grpc: a protobuf message
            from google.protobuf.json_format import MessageToDict

            stats = MessageToDict(stats, preserving_proto_field_name=True)
        model = stats["model_stats"][0]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))
    finally:
        client.close()


def measure(module, url: str, hidden_size: int, concurrency: int, tokens: int, seconds: float, warmup: float,
            seed: int, first_id: int) -> dict:
    """One row: ``concurrency`` client threads for ``warmup`` + ``seconds`` (module docstring)."""
    import numpy as np

    start = time.perf_counter()
    begin, end = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    stats_at_begin: list[tuple[int, int]] = []

    def client_loop(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        client = module.InferenceServerClient(url)
        hidden = module.InferInput("hidden", [1, hidden_size], "FP32")
        hidden.set_data_from_numpy(rng.standard_normal((1, hidden_size)).astype(np.float32))
        sequence = first_id + k * 1_000_000
        try:
            while time.perf_counter() < end:
                sequence += 1
                for t in range(tokens):
                    position = module.InferInput("positions", [1, 1], "INT64")
                    position.set_data_from_numpy(np.array([[t]], np.int64))
                    last = t == tokens - 1 or time.perf_counter() >= end
                    sent = time.perf_counter()
                    client.infer("tq_decode", [hidden, position], sequence_id=sequence,
                                 sequence_start=t == 0, sequence_end=last)
                    done = time.perf_counter()
                    if begin <= sent and done <= end:
                        latencies[k].append(done - sent)
                    if last:
                        break
        except Exception as err:  # noqa: BLE001 - reported after the row
            errors.append(f"client {k}: {' '.join(str(err).split())}")
        finally:
            client.close()

    def snapshot() -> None:
        time.sleep(max(0.0, begin - time.perf_counter()))
        stats_at_begin.append(_statistics(module, url))

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(concurrency)]
    watcher = threading.Thread(target=snapshot, daemon=True)
    watcher.start()
    for t in threads:
        t.start()
    watcher.join()
    time.sleep(max(0.0, end - time.perf_counter()))
    stats_at_end = _statistics(module, url)
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, first: {errors[0]}")
    flat = [x for row in latencies for x in row]
    inferences = stats_at_end[0] - stats_at_begin[0][0]
    executions = stats_at_end[1] - stats_at_begin[0][1]
    return {
        "concurrency": concurrency, "requests": len(flat), "steps_per_s": len(flat) / seconds,
        "p50_ms": _percentile(flat, 50) * 1e3, "p99_ms": _percentile(flat, 99) * 1e3,
        "mean_batch": inferences / executions if executions else float("nan"),
    }


def run(a) -> int:
    from tq_deploy.bench import serve_llm

    if serve_llm.is_llm_run(a):
        return serve_llm.run(a)
    import onnxruntime

    if any(c < 1 for c in a.concurrency):
        raise ValueError(f"--concurrency {a.concurrency}, expected values >= 1")
    for flag in ("tokens",):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag} {getattr(a, flag)}, expected >= 1")
    if not a.seconds > 0 or a.warmup < 0:
        raise ValueError(f"--seconds {a.seconds} / --warmup {a.warmup}, expected > 0 / >= 0")
    try:
        if a.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as err:
        raise ValueError(f"tritonclient[{a.protocol}] does not import ({err}): pip install 'tritonclient[http,grpc]'") \
            from None
    from tq_deploy.export.loaded import ExportedModel

    server = None
    with tempfile.TemporaryDirectory(prefix="tq-deploy-bench-serve-") as scratch:
        model = a.model
        try:
            if a.url is None:
                from tq_deploy.serve.server import ServeOptions, Tritonserver

                if model is None:
                    from tq_deploy.export.model import export_model

                    model = str(Path(scratch) / "model.onnx")
                    print("exporting the default decode model ...", flush=True)
                    export_model(None, model)
                config = ExportedModel.load(model).metadata
                blocks = a.num_blocks or max(a.concurrency) * -(-a.tokens // config["block_size"]) + 16
                ports = _free_ports(3)
                server = Tritonserver(ServeOptions(
                    model=model, num_blocks=blocks, provider=a.provider, threads=a.threads, max_batch=a.max_batch,
                    queue_delay_us=a.queue_delay_us, max_sequences=max(256, max(a.concurrency)), host="127.0.0.1",
                    http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2]))
                print(f"starting tq-deploy serve ({a.provider.upper()} EP, pool {blocks} blocks) ...", flush=True)
                server.start()
                url = server.grpc_url if a.protocol == "grpc" else server.http_url
                where = f"server started here: {a.provider.upper()} EP, threads={a.threads or 'default'}, " \
                        f"max batch {a.max_batch}, queue delay {a.queue_delay_us} us"
            else:
                url = a.url
                client = module.InferenceServerClient(url)
                try:
                    metadata = client.get_model_metadata("tq_decode")
                finally:
                    client.close()
                inputs = metadata["inputs"] if isinstance(metadata, dict) else \
                    [{"name": i.name, "shape": list(i.shape)} for i in metadata.inputs]
                hidden = next(i for i in inputs if i["name"] == "hidden")
                config = {"hidden_size": int(hidden["shape"][-1])}
                where = f"server at {url}"
            rows = []
            for k, concurrency in enumerate(a.concurrency):
                rows.append(measure(module, url, int(config["hidden_size"]), concurrency, a.tokens, a.seconds,
                                    a.warmup, a.seed, first_id=(k + 1) * 10**9))
        finally:
            if server is not None:
                server.stop()
    shape = ", ".join(f"{k}={config[k]}" for k in ("hidden_size", "num_q_heads", "num_kv_heads", "head_dim",
                                                    "k_bits", "v_bits", "block_size") if k in config)
    print(f"tq-deploy serve load: {a.protocol} client, sequences of {a.tokens} tokens, {a.seconds:g} s per row "
          f"after {a.warmup:g} s warm-up")
    print(f"model: {shape}")
    print(f"{where}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"(shared by client and server); onnxruntime {onnxruntime.__version__}")
    print()
    header = f"{'sequences':>9s} {'steps/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>10s} {'requests':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['concurrency']:9d} {r['steps_per_s']:9.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['mean_batch']:10.2f} {r['requests']:8d}")
    return 0


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
