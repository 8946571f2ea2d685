"""tq-deploy serve: the exported decode step as a stateful model in Triton Inference Server.

    tq-deploy serve                                   # export the default decode model, serve it on 8000/8001/8002
    tq-deploy serve --model model.onnx --num-blocks 4096 --max-batch 32
    tq-deploy serve --model model.onnx --provider cuda  # the CUDA EP (onnxruntime-gpu, a GPU)

Runs the tritonserver bundled with nvidia-pytriton (see tq_deploy/serve/server.py) with one
model, ``tq_decode``: a request carries one token of one sequence (``hidden`` [1, H] float32,
``positions`` [1, 1] int64) plus Triton's sequence_id / sequence_start / sequence_end; the KV
cache stays on the server in one paged pool. Prints a line when the server is ready and stops it
cleanly on SIGINT (Ctrl-C) or SIGTERM. docs/serving.md has the protocol and a client example.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="the decode model (.onnx from tq-deploy export; default: export the "
                                        "default TQModelConfig model first)")
    parser.add_argument("--num-blocks", type=int, default=1024, help="KV-cache pool size in blocks (default 1024)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="ONNX Runtime execution provider (default cpu)")
    parser.add_argument("--device-id", type=int, default=0, help="GPU of the CUDA provider (default 0)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences per decode step (default 32)")
    parser.add_argument("--queue-delay-us", type=int, default=500,
                        help="how long the batcher waits for more sequences to fill a step, in us (default 500)")
    parser.add_argument("--max-sequences", type=int, default=256,
                        help="sequences served at once; more wait for a free place (default 256)")
    parser.add_argument("--max-tokens", type=int, help="tokens one sequence may hold (default: the pool's size)")
    parser.add_argument("--idle-seconds", type=float, default=300.0,
                        help="end a sequence (and free its blocks) after this long without a request (default 300)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", help="write the server log here (default: a temporary folder, removed at exit)")


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.serve.server import ServeOptions, TritonServer, bundled_triton, libpython_dir

    for flag in ("num_blocks", "threads", "max_batch", "max_sequences", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}, expected >= 1")
    if args.max_sequences < args.max_batch:
        raise ValueError(f"--max-sequences {args.max_sequences}, expected >= --max-batch {args.max_batch}")
    if args.queue_delay_us < 0:
        raise ValueError(f"--queue-delay-us {args.queue_delay_us}, expected >= 0")
    if not args.idle_seconds > 0:
        raise ValueError(f"--idle-seconds {args.idle_seconds}, expected > 0")
    ports = {f: getattr(args, f) for f in ("http_port", "grpc_port", "metrics_port")}
    for flag, port in ports.items():
        if not 0 < port < 65536:
            raise ValueError(f"--{flag.replace('_', '-')} {port}, expected a TCP port 1..65535")
    if len(set(ports.values())) != 3:
        raise ValueError(f"--http-port/--grpc-port/--metrics-port {list(ports.values())}, expected three different ports")
    bundled_triton()  # fail before a long export when the server is not installed
    libpython_dir()
    if args.log:
        files.check_writable(args.log, "--log")
    with tempfile.TemporaryDirectory(prefix="tq-deploy-serve-model-") as scratch:
        model = args.model
        if model is None:
            from tq_deploy.export.model import export_model

            model = str(Path(scratch) / "model.onnx")
            print("tq-deploy serve: exporting the default decode model", flush=True)
            export_model(None, model)
        elif not Path(model).is_file():
            raise ValueError(f"--model {model!r} does not exist, expected an .onnx from tq-deploy export")
        options = ServeOptions(model=model, num_blocks=args.num_blocks, provider=args.provider,
                               device_id=args.device_id, library=args.library, threads=args.threads,
                               max_batch=args.max_batch, queue_delay_us=args.queue_delay_us,
                               max_sequences=args.max_sequences, max_tokens=args.max_tokens,
                               idle_seconds=args.idle_seconds, host=args.host, http_port=args.http_port,
                               grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_path=args.log)
        return _serve(TritonServer(options), args)


def _serve(server, args) -> int:
    """Start ``server``, report, wait for SIGINT/SIGTERM (or the server's death), stop it."""
    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print("tq-deploy serve: starting tritonserver", flush=True)
        server.start()
        try:
            c = server.model_config_values
            print(f"tq-deploy serve: ready: model tq_decode on http {args.host}:{args.http_port}, grpc "
                  f"{args.host}:{args.grpc_port}, metrics {args.host}:{args.metrics_port}; pool {args.num_blocks} "
                  f"blocks x {c['block_size']} tokens ({server.pool_bytes() / 2**20:.1f} MiB), "
                  f"{args.provider.upper()} EP, up to {args.max_batch} sequences per step; SIGINT/SIGTERM stops it",
                  flush=True)
            while not stop.wait(0.5):
                if not server.alive():
                    print(f"tq-deploy serve: error: tritonserver exited with status {server.process.returncode}; "
                          f"end of its log:\n{server.log_tail()}", file=sys.stderr, flush=True)
                    return 1
            print(f"tq-deploy serve: {received[0]}: stopping", flush=True)
        finally:
            status = server.stop()
        print(f"tq-deploy serve: stopped (tritonserver exit status {status})", flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
