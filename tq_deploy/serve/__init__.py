"""Serving the exported LLM, and the synthetic decode step, behind Triton Inference Server (tritonserver).

In this package "tritonserver" is the inference server; "triton" alone (tq_deploy.triton) is the
kernel compiler.

    (the paged KV-cache pool, block tables per sequence, is tq_deploy.runtime.block_pool: the generation loop uses it too)
    engine.py              the LLM's engine: continuous batching over LLMSession and the pool
    textgen.py             a text request's fields checked at the edge; tokens to text, stop strings
    http_app.py            the LLM's HTTP front end: OpenAI completions/chat (SSE), Triton's generate protocol
    tritonserver_llm.py    the engine and the front end as a decoupled model (tq_llm) in the Python backend
    llm_client.py          the gRPC client side of tq_llm (tritonclient)
    decoder.py             many sequences' tokens batched into one run of the model over the pool
    tritonserver_model.py  that decoder as a stateful model in tritonserver's Python backend
    server.py              runs it in the tritonserver bundled with nvidia-pytriton (tq-deploy serve)
    repository.py          a model repository for a stock tritonserver: onnxruntime and tensorrt
                           backends, the cache as the sequence batcher's implicit state
                           (tq-deploy triton-repo)
    pbtxt.py               config.pbtxt written from Python values, checked against tritonserver's schema
"""
