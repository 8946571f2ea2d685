"""Serving the exported decode step behind Triton Inference Server.

    pool.py          one paged KV-cache pool: block tables per sequence, blocks freed on end
    decoder.py       many sequences' tokens batched into one run of the model over the pool
    triton_model.py  that decoder as a stateful model in Triton's Python backend
    server.py        runs it in the tritonserver bundled with nvidia-pytriton (tq-deploy serve)
    repository.py    a model repository for a stock Triton: onnxruntime and tensorrt backends,
                     the cache as the sequence batcher's implicit state (tq-deploy triton-repo)
    pbtxt.py         config.pbtxt written from Python values, checked against Triton's schema
"""
