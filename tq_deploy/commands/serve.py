"""tq-deploy serve: an exported LLM (text in, tokens streamed out) or the synthetic decode step in tritonserver.

    tq-deploy serve --model smollm2                   # export SmolLM2 first, serve it: OpenAI API on 8000, gRPC 8001
    tq-deploy serve --model smollm2.onnx --kv-memory 4 --provider cuda
    tq-deploy serve --model ./hf-folder --kv-preset quality
    tq-deploy serve                                   # the synthetic decode step (tq_decode), as before
    tq-deploy serve --model model.onnx --num-blocks 4096 --max-batch 32   # a decode-step export

An LLM (an .onnx of `tq-deploy export --model`, or a checkpoint folder, GGUF file or name, exported
first with the same width flags as export) is served as ``tq_llm``: one engine of continuous
batching over a TurboQuant pool of --kv-memory GiB, reached through tritonserver's gRPC streaming
and through the HTTP front end on --http-port (OpenAI /v1/completions and /v1/chat/completions,
Triton's generate and generate_stream). A decode-step export is served as ``tq_decode``: a request
carries one token of one sequence (``hidden`` [1, H] float32, ``positions`` [1, 1] int64) plus
tritonserver's sequence_id / sequence_start / sequence_end.

Both listen on 127.0.0.1 unless --host says otherwise. Prints a line when the server is ready and
stops it cleanly on SIGINT (Ctrl-C) or SIGTERM. docs/serving.md has the protocols and the threat model.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tq_deploy.cli import count
from tq_deploy.commands.export import add_key_mean_argument
from tq_deploy.ops import SUPPORTED_BITS


def below(high: str, unit: str):
    """An argparse type: a float in (0, ``high``) of ``unit``, an error naming both otherwise."""
    limit = float(high)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number, expected {unit} in (0, {high})") from None
        if not 0 < value < limit:
            raise argparse.ArgumentTypeError(f"{text}, expected {unit} in (0, {high})")
        return value

    return parse


gib = below("1e5", "GiB")
seconds = below("1e6", "seconds")


def add_arguments(parser) -> None:
    parser.add_argument("--model", metavar="MODEL.onnx|FOLDER|NAME",
                        help="an LLM: .onnx from `tq-deploy export --model`, or a checkpoint folder, .gguf or "
                             "'smollm2' (exported first with the width flags below); or a decode-step .onnx; "
                             "default: export the synthetic decode model first")
    parser.add_argument("--kv-memory", type=gib, default=1.0, metavar="GiB",
                        help="LLM: memory of the TurboQuant KV pool in GiB (default 1); the ready line says how many "
                             "tokens it holds and how many an fp16 cache would")
    parser.add_argument("--chunk-size", type=count(1), default=256,
                        help="LLM: prompt tokens of one sequence per step (default 256, as generate)")
    parser.add_argument("--step-tokens", type=count(1), default=512,
                        help="LLM: tokens per step, decodes and prompt chunks together (default 512)")
    parser.add_argument("--wait-timeout", type=seconds, default=60.0,
                        help="LLM: a request waiting this long for cache space gets an error (default 60 s)")
    parser.add_argument("--drain-seconds", type=seconds, default=30.0,
                        help="LLM: on SIGTERM, how long running requests may finish (default 30 s)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="LLM export: float type of the weights (default float32)")
    parser.add_argument("--num-blocks", type=int, default=1024,
                        help="decode step: KV-cache pool size in blocks (default 1024)")
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
    # the LLM export's widths, as `tq-deploy export --model` takes them
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="LLM export: bits of keys and values (both)")
    parser.add_argument("--k-bits", type=int, choices=SUPPORTED_BITS, help="LLM export: bits of keys")
    parser.add_argument("--v-bits", type=int, choices=SUPPORTED_BITS, help="LLM export: bits of values")
    parser.add_argument("--kv-preset", metavar="NAME", help="LLM export: named key/value widths (as export)")
    parser.add_argument("--plan", metavar="JSON", help="LLM export: per-layer widths from `tq-deploy calibrate`")
    parser.add_argument("--block-size", type=int, help="LLM export: tokens per cache block (default 16)")
    parser.add_argument("--seed", type=int, help="LLM export: rotation seed (default 0)")
    parser.add_argument("--rotation", choices=("haar", "hadamard"), help="LLM export: rotation family")
    add_key_mean_argument(parser, "LLM export: ")
    parser.add_argument("--max-tokens", type=int, help="tokens one sequence may hold (default: the pool's size)")
    parser.add_argument("--idle-seconds", type=float, default=300.0,
                        help="end a sequence (and free its blocks) after this long without a request (default 300)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only); 0.0.0.0 exposes the "
                             "unauthenticated ports to the network (docs/serving.md)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", help="write the server log here (default: a temporary folder, removed at exit)")


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.serve.server import ServeOptions, Tritonserver, bundled_tritonserver, libpython_dir

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
    if args.step_tokens < args.chunk_size:
        raise ValueError(f"--step-tokens {args.step_tokens}, expected >= --chunk-size {args.chunk_size}")
    check_host(args.host)
    bundled_tritonserver()  # fail before a long export when the server is not installed
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
        elif not (Path(model).is_file() and model.endswith(".onnx")):
            model = _export_llm(args, str(Path(scratch) / "model.onnx"))
        else:
            given = [f"--{n.replace('_', '-')}" for n in EXPORT_FLAGS if getattr(args, n) is not None]
            if given:
                raise ValueError(f"--model {model!r} is an exported .onnx with {' '.join(given)}, expected none of "
                                 "them (the export fixed the cache's widths; pass a checkpoint to export it anew)")
        options = ServeOptions(model=model, num_blocks=args.num_blocks, provider=args.provider,
                               device_id=args.device_id, library=args.library, threads=args.threads,
                               max_batch=args.max_batch, queue_delay_us=args.queue_delay_us,
                               max_sequences=args.max_sequences, max_tokens=args.max_tokens,
                               idle_seconds=args.idle_seconds, host=args.host, http_port=args.http_port,
                               grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_path=args.log,
                               kv_memory_gib=args.kv_memory, chunk_size=args.chunk_size, step_tokens=args.step_tokens,
                               wait_timeout_s=args.wait_timeout, drain_s=args.drain_seconds)
        return _serve(Tritonserver(options), args)


EXPORT_FLAGS = ("bits", "k_bits", "v_bits", "kv_preset", "plan", "block_size", "seed", "rotation", "key_mean",
                "norm_dtype")


def check_host(host: str) -> None:
    """--host must be an IP address of this machine's form (a name would be resolved by each server
    differently); binding may still fail, which tritonserver's log then says."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host {host!r} is not an IP address, expected e.g. 127.0.0.1 (default), ::1 or "
                         "0.0.0.0 (every interface: exposes the server to the network)") from None


def _export_llm(args, out: str) -> str:
    """Export the checkpoint --model names (folder, GGUF file or name) with the width flags, as export does."""
    from tq_deploy.commands.export import MODEL_OPTIONS, llm_options_from_args
    from tq_deploy.export.llm import export_llm

    if not Path(args.model).exists() and "/" in args.model:
        raise ValueError(f"--model {args.model!r} does not exist, expected an .onnx from `tq-deploy export --model`, "
                         "a checkpoint folder, a .gguf file or a name (smollm2)")
    export_args = argparse.Namespace(**{n: None for n in MODEL_OPTIONS})
    for name in (*EXPORT_FLAGS, "model"):
        setattr(export_args, name, getattr(args, name))
    export_args.op = None
    options = llm_options_from_args(export_args)
    print(f"tq-deploy serve: exporting {args.model} (the LLM, {args.dtype})", flush=True)
    export_llm(args.model, out, dtype=args.dtype, **options)
    return out


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
            if server.llm:
                from tq_deploy.serve.engine import pool_size

                pool = pool_size(server.options.model, args.kv_memory)
                print(f"tq-deploy serve: ready: model tq_llm; OpenAI base URL {server.openai_base_url} (and "
                      f"/v2/models/tq_llm/generate[_stream]), gRPC {args.host}:{args.grpc_port}, metrics "
                      f"{args.host}:{args.metrics_port}; {pool.describe()}; {args.provider.upper()} EP; "
                      "SIGINT/SIGTERM stops it", flush=True)
            else:
                c = server.model_config_values
                print(f"tq-deploy serve: ready: model tq_decode on http {args.host}:{args.http_port}, grpc "
                      f"{args.host}:{args.grpc_port}, metrics {args.host}:{args.metrics_port}; pool {args.num_blocks} "
                      f"blocks x {c['block_size']} tokens ({server.pool_bytes() / 2**20:.1f} MiB), "
                      f"{args.provider.upper()} EP, up to {args.max_batch} sequences per step; SIGINT/SIGTERM stops "
                      "it", flush=True)
            while not stop.wait(0.5):
                if not server.alive():
                    print(f"tq-deploy serve: error: tritonserver exited with status {server.process.returncode}; "
                          f"end of its log:\n{server.log_tail()}", file=sys.stderr, flush=True)
                    return 1
            print(f"tq-deploy serve: {received[0]}: stopping", flush=True)
        finally:
            status = server.stop()
        print(f"tq-deploy serve: stopped (tritonserver exit status {status})", flush=True)
        return 0 if status == 0 else 1  # a stop that did not end cleanly is not a success
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
