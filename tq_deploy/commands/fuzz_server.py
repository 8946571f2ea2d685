"""tq-deploy fuzz-server: seeded hostile and valid requests against the LLM server, with its invariants checked.

    tq-deploy fuzz-server --model model.onnx --requests 300           # start a server, fuzz it, stop it
    tq-deploy fuzz-server --url http://127.0.0.1:8000 --grpc 127.0.0.1:8001 --requests 10000 --seed 7
    tq-deploy fuzz-server --model model.onnx --seed 7 --first 1234 --requests 1     # replay one request

See tq_deploy/serve/fuzz.py for what is sent and what must hold. Exit status: 0 no failures,
1 failures (each with its seed and request), 2 bad options.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading

from tq_deploy.cli import count


def add_arguments(parser) -> None:
    from tq_deploy.commands.serve import gib, seconds

    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running LLM server's HTTP front end (http://HOST:PORT)")
    target.add_argument("--model", metavar="MODEL.onnx|FOLDER|NAME",
                        help="start `tq-deploy serve --model MODEL` on free local ports, fuzz it, stop it with "
                             "SIGTERM and check that it exits with status 0")
    parser.add_argument("--grpc", metavar="HOST:PORT", help="with --url: also fuzz tritonserver's gRPC stream here")
    parser.add_argument("--no-grpc", action="store_true", help="with --model: HTTP only")
    parser.add_argument("--kv-memory", type=gib, default=0.25, metavar="GiB", help="with --model (default 0.25)")
    parser.add_argument("--serve-args", default="", metavar="'ARGS'",
                        help="with --model: more `tq-deploy serve` flags, one string (e.g. '--chunk-size 16')")
    parser.add_argument("--seed", type=count(0), default=0, help="seed of the run (request i draws from (seed, i))")
    parser.add_argument("--requests", type=count(1), default=300, help="number of requests (default 300)")
    parser.add_argument("--first", type=count(0), default=0, help="index of the first request (replay: --first I "
                                                                  "--requests 1)")
    parser.add_argument("--concurrency", type=count(1), default=8, help="client threads (default 8)")
    parser.add_argument("--batch", type=count(1), default=50,
                        help="requests between two checks that the server still answers (default 50)")
    parser.add_argument("--victims", type=count(0), default=2,
                        help="long streams running the whole time, whose ids the forging requests copy (default 2)")
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds one request may take (default 60)")
    parser.add_argument("--kinds", help="comma-separated kinds of request (default all; see tq_deploy/serve/fuzz.py)")
    parser.add_argument("--grpc-cancel-refused", action="store_true",
                        help="also cancel the gRPC streams that tritonserver's input check refused (a known "
                             "tritonserver 2.51 issue: the server then takes its whole exit timeout and exits 1)")
    parser.add_argument("--no-huge", action="store_true", help="leave out the bodies of several MiB")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.serve.fuzz import FuzzOptions, check_options, fuzz_server

    if args.grpc and not args.url:
        raise ValueError(f"--grpc {args.grpc} goes with --url (with --model the fuzzer knows the port)")
    if args.json:
        files.check_writable(args.json, "--json", inputs=[("--model", args.model)] if args.model else [])
    options = FuzzOptions(url=args.url or "", grpc=args.grpc, seed=args.seed, requests=args.requests,
                          first=args.first, concurrency=args.concurrency, batch=args.batch, victims=args.victims,
                          timeout_s=args.timeout, huge=not args.no_huge, cancel_refused=args.grpc_cancel_refused,
                          kinds=tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None)
    check_options(FuzzOptions(**{**options.__dict__, "grpc": options.grpc or (
        "started" if args.model and not args.no_grpc else None)}))
    server = None
    if args.model:
        server = _start(args)
        options.url = f"http://127.0.0.1:{server.http}"
        options.grpc = None if args.no_grpc else f"127.0.0.1:{server.grpc}"
    try:
        report = fuzz_server(options, alive=(lambda: server.process.poll() is None) if server else None)
    finally:
        if server is not None:
            status = server.stop(args.timeout)
    if server is not None:
        report.exit_status = status
        if status != 0 or not any("stopped (tritonserver exit status 0)" in line for line in server.lines):
            from tq_deploy.serve.fuzz import Failure

            stopped = next((line for line in reversed(server.lines) if "stopped (" in line), "no 'stopped' line")
            report.failures.append(Failure(args.seed, -1, "exit", f"after SIGTERM the server exited with status "
                                           f"{status} and {stopped!r}, expected 0 and tritonserver exit status 0",
                                           "SIGTERM"))
    print(report.to_text())
    if args.json:
        files.write_text(args.json, json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


class _Server:
    def __init__(self, process, http, grpc):
        self.process, self.http, self.grpc = process, http, grpc
        self.lines: list[str] = []
        self.reader: threading.Thread | None = None

    def stop(self, timeout: float) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        if self.reader is not None:
            self.reader.join(10)  # its last line ("stopped (tritonserver exit status S)") is read
        return status


def _start(args) -> _Server:
    from tq_deploy.bench.serve import _free_ports

    http, grpc, metrics = _free_ports(3)
    command = [sys.executable, "-m", "tq_deploy.cli", "serve", "--model", args.model, "--kv-memory",
               str(args.kv_memory), "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
               str(metrics), *shlex.split(args.serve_args)]
    print(f"starting tq-deploy serve --model {args.model} --kv-memory {args.kv_memory} {args.serve_args} ...",
          flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = _Server(process, http, grpc)
    for line in process.stdout:
        server.lines.append(line.rstrip("\n"))
        if "ready:" in line:
            print(line.strip(), flush=True)
            break
    else:
        status = process.wait()
        raise RuntimeError(f"tq-deploy serve exited with status {status} before it was ready: "
                           + " | ".join(server.lines[-5:]))

    def drain():
        for line in process.stdout:
            server.lines.append(line.rstrip("\n"))

    server.reader = threading.Thread(target=drain, daemon=True)
    server.reader.start()
    return server
