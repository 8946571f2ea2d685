"""Needle in a haystack: does a quantized cache keep what a long context holds?

A passcode sentence is put at a depth of a haystack cut from the shipped texts, the whole given to the
model as one user message that ends with the question, and the model answers greedily. The haystack
goes through the eval's QuantizedKVCache in chunks, as eval-ppl's text does, so every configuration
eval-ppl takes (presets, ``mse-4-kpc1@generated``, KIVI, ...) can be asked; a trial passes when the
answer holds the passcode. Perplexity averages over every token; retrieval needs the few keys of one
sentence to keep winning the attention, which a cache can lose while its perplexity holds.

    trials = needle_trials(loaded, configs, contexts=[1024, 4096], depths=[0.1, 0.5, 0.9])
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NEEDLE = "The secret passcode is {code}."
QUESTION = "What is the secret passcode in the text above? Answer with the number only."
_PLACEHOLDER = "\u2063HAYSTACK\u2063"


@dataclass
class Trial:
    config: str
    context: int  # tokens of the prompt, template and question included
    depth: float  # where the needle sits in the haystack, 0 (start) to 1 (end)
    code: str
    answer: str

    @property
    def passed(self) -> bool:
        return self.code in self.answer

    def to_dict(self) -> dict:
        return {"config": self.config, "context": self.context, "depth": self.depth, "code": self.code,
                "answer": self.answer, "passed": self.passed}


def filler_ids(tokenizer) -> list[int]:
    """The shipped texts, one after the other, as token ids: the haystack's material."""
    from tq_deploy.models.texts import SHIPPED_TEXTS, read_text, shipped_text_path

    text = "\n\n".join(read_text(shipped_text_path(f)) for f in SHIPPED_TEXTS.values())
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt_ids(tokenizer, filler: list[int], context: int, depth: float, code: str) -> list[int]:
    """A prompt of ``context`` tokens: the chat template around the haystack (``filler`` cut to fit, the
    needle sentence at ``depth`` of it, repeated from its start if too short) and the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}, expected 0 .. 1")
    message = [{"role": "user", "content": f"{_PLACEHOLDER}\n\n{QUESTION}"}]
    template = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    head, tail = template.split(_PLACEHOLDER)
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    needle = tokenizer(f" {NEEDLE.format(code=code)} ", add_special_tokens=False).input_ids
    room = context - len(head_ids) - len(tail_ids) - len(needle)
    if room < 1:
        raise ValueError(f"context={context} tokens, expected more than the template, question and needle "
                         f"({context - room + 1})")
    hay = (filler * (room // max(len(filler), 1) + 1))[:room]
    at = int(round(depth * room))
    return head_ids + hay[:at] + needle + hay[at:] + tail_ids


@torch.no_grad()
def greedy_answer(model, ids: list[int], quantizer=None, max_new_tokens: int = 24, chunk_size: int = 256,
                  eos_ids=()) -> list[int]:
    """The greedy continuation of ``ids`` with every cached key and value through ``quantizer`` (None: the
    fp32 cache), the prompt in chunks of ``chunk_size`` as eval-ppl feeds a text."""
    from tq_deploy.eval.cache import QuantizedKVCache
    from tq_deploy.eval.kv_quantizers import KVQuantizer
    from tq_deploy.eval.perplexity import _cache_keyword

    device = next(model.parameters()).device
    cache = QuantizedKVCache(quantizer if quantizer is not None else KVQuantizer())
    keyword = {_cache_keyword(model): cache}
    prompt = torch.tensor([ids], device=device)
    logits = None
    for start in range(0, prompt.shape[1], chunk_size):
        logits = model(input_ids=prompt[:, start:start + chunk_size], use_cache=True, **keyword).logits
    out = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in eos_ids:
            break
        out.append(token)
        logits = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **keyword).logits
    return out


def needle_trials(loaded, configs, contexts, depths, seed: int = 0, chunk_size: int = 256, progress=None):
    """One Trial per (configuration, context, depth): configs are eval CacheConfigs (fp32 is the
    identity); each (context, depth) has its own 5-digit passcode, the same for every configuration."""
    from tq_deploy.eval.kv_quantizers import build_kv_quantizer
    from tq_deploy.eval.perplexity import calibration_statistics

    tokenizer = loaded.tokenizer
    filler = filler_ids(tokenizer)
    eos = getattr(loaded.model.config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if isinstance(eos, int) else ())
    draw = random.Random(seed)
    cases = [(context, depth, str(draw.randrange(10000, 100000))) for context in contexts for depth in depths]
    trials = []
    for config in configs:
        statistics = calibration_statistics(loaded, config.calibration, chunk_size) if config.transform else None
        for context, depth, code in cases:
            # a fresh quantizer per prompt: the calibrated transforms count positions from its first token
            quantizer = None if config.method == "fp32" else build_kv_quantizer(config, loaded.head_dim, seed,
                                                                                statistics)
            ids = prompt_ids(tokenizer, filler, context, depth, code)
            answer = tokenizer.decode(greedy_answer(loaded.model, ids, quantizer, chunk_size=chunk_size,
                                                    eos_ids=eos_ids)).strip()
            trial = Trial(config.name, context, depth, code, answer)
            trials.append(trial)
            if progress is not None:
                progress(trial)
    return trials
