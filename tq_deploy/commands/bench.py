"""tq-deploy bench WHAT: the benchmarks of tq_deploy.bench, each printing a table.

    tq-deploy bench quantizer              # encode/decode throughput and the MSE table (CPU)
    tq-deploy bench gpu [--quick]          # CUDA kernels vs the best torch SDPA (needs a CUDA GPU)
    tq-deploy bench ort                    # TQPagedAttention in ONNX Runtime (CPU) vs the reference
    tq-deploy bench ort-cuda               # ORT CUDA EP: node vs PyTorch, step vs GroupQueryAttention
    tq-deploy bench profile 8x32768        # calls for a profiler, host time per call
    tq-deploy bench sass                   # loop instruction counts of the CUDA kernels (no GPU)
    tq-deploy bench serve                  # steps/s, p50/p99 latency of 1/8/32 sequences via tq-deploy serve
"""

from __future__ import annotations

import importlib

from tq_deploy.bench import MODULES


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, module in MODULES.items():
        doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
        cmd = sub.add_parser(name, help=doc, description=doc)
        cmd.set_defaults(_bench_module=module)
        importlib.import_module(module).add_arguments(cmd)


def run(args) -> int:
    return importlib.import_module(args._bench_module).run(args)
