"""Text in, text out: ``tq_deploy.generate`` over the exported LLM (or any generation backend).

    from tq_deploy import generate
    results = generate("smollm2.onnx", ["The capital of France is", "Once upon a time"], max_new_tokens=32,
                       stream=lambda i, text: print(i, text))
    print(results[0].text)

The tokenizer is the one the model's metadata names (its Hugging Face folder, its GGUF file, or
the shipped model ``smollm2``), loaded offline. Prompts are tokenized, batched through
:func:`tq_deploy.runtime.generation.generate_ids` (chunked prefill, then decode, on a paged cache
whose blocks are taken on demand) and the new tokens are turned back into text as they come:
``stream(i, text)`` gets each piece of prompt i's continuation once it decodes to whole
characters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tq_deploy.runtime.generation import DEFAULT_CHUNK_SIZE, GenerationStats, blocks_needed, generate_ids
from tq_deploy.runtime.sampling import SamplingParams

@dataclass
class Generation:
    """One prompt's continuation."""

    prompt: str
    text: str
    tokens: list[int]
    finish_reason: str  # "eos" or "length"
    prompt_tokens: int


def tokenizer_source(config: dict):
    """Where the exported model's tokenizer comes from, as its metadata says."""
    source = config.get("tokenizer")
    if not source:
        raise ValueError(f"model metadata has no 'tokenizer' (keys {sorted(config)}), expected the tokenizer's "
                         "source (model folder, GGUF file or 'smollm2'); pass tokenizer= instead")
    return source


def load_tokenizer(source):
    """The tokenizer of ``source`` ("smollm2", a model folder or a GGUF file), offline."""
    from tq_deploy.models import load_tokenizer as load

    return load(os.fspath(source), what="tokenizer")


def eos_token_ids(config: dict, tokenizer) -> list[int]:
    """End-of-sequence ids: the model config's and the tokenizer's."""
    ids = config.get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


class TextStream:
    """Incremental detokenization of one sequence: the text each new token adds, held back while the
    tokens so far end inside a multi-byte character (decoded as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def open_backend(model, provider: str = "cpu", library=None, threads: int | None = None):
    """(backend, made_here): an LLMSession for a path, or ``model`` itself when it is a backend already."""
    if isinstance(model, (str, os.PathLike)):
        from tq_deploy.runtime.llm_session import LLMSession

        return LLMSession(model, provider=provider, num_blocks=1, library=library, threads=threads), True
    if not all(hasattr(model, a) for a in ("step", "block_size", "num_blocks", "config")):
        raise ValueError(f"model={model!r:.80}, expected an .onnx path, an LLMSession or a generation backend")
    return model, False


def generate(model, prompts: str | Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, provider: str = "cpu",
             stream: Callable[[int, str], None] | None = None, *, tokenizer=None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, num_blocks: int | None = None, library=None,
             threads: int | None = None, stats: GenerationStats | None = None) -> list[Generation]:
    """Continue every prompt with the exported LLM (module docstring); one Generation per prompt.

    ``model``: the .onnx path (a session on ``provider`` is made for this call, its cache sized
    for these prompts, or ``num_blocks``), an LLMSession, or another backend (its cache as it is).
    Greedy when ``temperature`` is 0, else temperature/top-p sampling from ``seed``.
    ``stats`` receives the prefill and decode token counts and times.
    """
    sampling = SamplingParams(temperature, top_p, seed)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"prompts={prompts!r:.80}, expected a string or a non-empty list of strings")
    backend, made_here = open_backend(model, provider, library, threads)
    tokenizer = load_tokenizer(tokenizer_source(backend.config)) if tokenizer is None else \
        load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    ids = [tokenizer(t).input_ids for t in texts]
    if made_here or num_blocks is not None:
        wanted = num_blocks if num_blocks is not None else \
            blocks_needed([len(i) for i in ids], max_new_tokens, backend.block_size)
        if wanted != backend.num_blocks:
            backend.resize(max(int(wanted), 1))
    streams = [TextStream(tokenizer) for _ in texts]

    def on_token(i: int, token: int) -> None:
        piece = streams[i].add(token)
        if piece and stream is not None:
            stream(i, piece)

    completions = generate_ids(backend, ids, max_new_tokens, sampling, eos_token_ids(backend.config, tokenizer),
                               chunk_size, on_token, stats, backend.config.get("max_position_embeddings"))
    results = [Generation(text, tokenizer.decode(c.tokens, skip_special_tokens=True), c.tokens, c.finish_reason,
                          c.prompt_tokens) for text, c in zip(texts, completions)]
    for i, r in enumerate(results):  # what a stream held back (a character split at the last token)
        if stream is not None and r.text.startswith(streams[i].text) and len(r.text) > len(streams[i].text):
            stream(i, r.text[len(streams[i].text):])
    return results
