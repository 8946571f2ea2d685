"""Benchmarks, one module per target, each a ``tq-deploy bench`` verb that prints a table:

    quantizer  encode/decode throughput of the reference and the MSE table (CPU or any torch device)
    gpu        decode attention and encode on a CUDA GPU: every backend against torch fp16 SDPA
    ort        TQPagedAttention in ONNX Runtime (CPU or CUDA EP) beside the PyTorch reference
    profile    repeated calls of the CUDA attention for a profiler (ncu), with the host time per call
    sass       loop instruction counts of the CUDA kernels from their sm_90 SASS (no GPU needed)
    serve      steps/s and latency of concurrent sequences through tq-deploy serve (tritonclient)

Each module has ``add_arguments(parser)`` and ``run(args) -> int``.
"""

MODULES = {
    "quantizer": "tq_deploy.bench.quantizer",
    "gpu": "tq_deploy.bench.gpu",
    "ort": "tq_deploy.bench.ort",
    "profile": "tq_deploy.bench.profile",
    "sass": "tq_deploy.bench.sass",
    "serve": "tq_deploy.bench.serve",
}
