"""Benchmarks, one module per target, each a ``tq-deploy bench`` verb that prints a table:

    quantizer  encode/decode throughput of the reference and the MSE table (CPU or any torch device)
    gpu        decode attention, encode and cache update on a CUDA GPU against the best torch fp16 SDPA
    ort        TQPagedAttention in ONNX Runtime (CPU EP) beside the PyTorch reference
    ort-cuda   ONNX Runtime on the CUDA EP: the node vs PyTorch, the decode step vs GroupQueryAttention
    profile    repeated calls of the CUDA attention for a profiler (ncu), with the host time per call
    sass       loop instruction counts of the CUDA kernels from their sm_90 SASS (no GPU needed)
    prefill    TQPagedPrefill on a CUDA GPU against torch fp16 SDPA with a causal mask
    generate   end-to-end generation of a real model: tq-deploy in ORT beside onnxruntime-genai and transformers
    serve      steps/s and latency of concurrent sequences through tq-deploy serve (tritonclient)

Each module has ``add_arguments(parser)`` and ``run(args) -> int``.
"""

MODULES = {
    "quantizer": "tq_deploy.bench.quantizer",
    "gpu": "tq_deploy.bench.gpu",
    "ort": "tq_deploy.bench.ort",
    "ort-cuda": "tq_deploy.bench.ort_cuda",
    "profile": "tq_deploy.bench.profile",
    "sass": "tq_deploy.bench.sass",
    "generate": "tq_deploy.bench.generate",
    "prefill": "tq_deploy.bench.prefill",
    "serve": "tq_deploy.bench.serve",
}
