"""The generation loop (runtime/generation.py) and the sampler, on the PyTorch reference decoder:
chunked prefill and batching change nothing, the loop's paged steps equal recomputing every
sequence from scratch, blocks come and go with the sequences, sampling is seeded. The ONNX Runtime
session against this backend is tests/test_llm_session.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tq_deploy.runtime.generation import GenerationStats, blocks_needed, generate_ids, pack_step
from tq_deploy.runtime.sampling import SamplingParams, next_token, top_p_probabilities


def tiny_decoder(seed: int, cache: str = "turboquant", **options):
    from tq_deploy.reference.llama import DecoderConfig, LlamaDecoder

    values = dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=2, num_q_heads=6, num_kv_heads=2,
                  head_dim=16, block_size=4, k_bits=4, v_bits=3, seed=seed % 100, cache=cache,
                  tie_word_embeddings=False)
    values.update(options)
    model = LlamaDecoder(DecoderConfig(**values))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def random_prompts(gen, lengths, vocab=61):
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def run(model, prompts, new=6, num_blocks=64, **kwargs):
    from tq_deploy.runtime.reference_backend import ReferenceBackend

    return generate_ids(ReferenceBackend(model, num_blocks), prompts, new, **kwargs)


def recompute_greedy(model, prompt, new):
    """The oracle: every new token from a fresh cache holding the whole sequence, written in one call."""
    from tq_deploy.reference.llama import allocate_caches, step_inputs

    tokens = list(prompt)
    out = []
    b = model.config.block_size
    for _ in range(new):
        blocks = -(-len(tokens) // b)
        table = torch.arange(blocks, dtype=torch.int32)[None]
        inputs = step_inputs([tokens], [0], table, b)
        with torch.no_grad():
            logits = model(*inputs.values(), *allocate_caches(model.config, blocks))[0]
        out.append(int(logits[-1].argmax()))
        tokens.append(out[-1])
    return out


@pytest.mark.parametrize("cache", ["turboquant", "float32"])
def test_paged_steps_equal_recomputing_from_scratch(seed, cache):
    model = tiny_decoder(seed, cache)
    prompts = random_prompts(torch.Generator().manual_seed(seed), [9, 1, 5])
    got = run(model, prompts, new=5, chunk_size=3)
    for prompt, completion in zip(prompts, got):
        assert completion.tokens == recompute_greedy(model, prompt, 5)
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(prompt)


def test_batching_and_chunking_change_nothing(seed):
    model = tiny_decoder(seed)
    prompts = random_prompts(torch.Generator().manual_seed(seed), [7, 2, 13, 4])
    batched = run(model, prompts, new=7, chunk_size=3)
    for i, prompt in enumerate(prompts):
        for chunk in (3, 1, 64):  # the same chunks, one token at a time, the whole prompt at once
            assert run(model, [prompt], new=7, chunk_size=chunk)[0].tokens == batched[i].tokens, (i, chunk)


def test_the_last_token_logits_of_a_step_are_the_full_forward(seed):
    """pack_step's rows, slots and block tables against the reference's own step_inputs."""
    from tq_deploy.reference.llama import step_inputs

    rows = [([5, 6, 7], 2, [3, 0]), ([1], 6, [1, 4]), ([8, 9, 10, 11, 12], 0, [2, 5])]
    step = pack_step(rows, block_size=4)
    tables = torch.tensor([[3, 0], [1, 4], [2, 5]], dtype=torch.int32)
    want = step_inputs([r[0] for r in rows], [r[1] for r in rows], tables, 4)
    for name, value in step.arrays().items():
        np.testing.assert_array_equal(value, want[name].numpy(), err_msg=name)
        assert value.dtype == want[name].numpy().dtype, name
    every = pack_step(rows, 4, logits_rows="all")
    np.testing.assert_array_equal(every.logits_index, np.arange(9))


def test_sampling_is_seeded_and_per_sequence(seed):
    model = tiny_decoder(seed)
    prompts = random_prompts(torch.Generator().manual_seed(seed), [5, 3])
    params = SamplingParams(temperature=1.5, top_p=0.9, seed=seed)
    first = run(model, prompts, new=8, sampling=params)
    assert [c.tokens for c in run(model, prompts, new=8, sampling=params)] == [c.tokens for c in first]
    # sequence 0 draws from its own stream: alone it samples the same tokens
    assert run(model, prompts[:1], new=8, sampling=params)[0].tokens == first[0].tokens
    others = [run(model, prompts, new=8, sampling=SamplingParams(1.5, 0.9, seed + k))[0].tokens for k in (1, 2, 3)]
    assert any(o != first[0].tokens for o in others)


def test_eos_stops_a_sequence_and_its_blocks_serve_the_others(seed):
    model = tiny_decoder(seed)
    gen = torch.Generator().manual_seed(seed)
    long = random_prompts(gen, [6])[0]
    alone = run(model, [long], new=12)[0].tokens
    for _ in range(20):  # a short prompt whose first new token the long sequence never makes
        short = random_prompts(gen, [4])[0]
        stopper = run(model, [short], new=1)[0].tokens[0]
        if stopper not in alone:
            break
    else:
        pytest.skip("every short prompt's first token appears in the long one's continuation")
    # the long sequence alone needs 5 blocks of 4 (6 + 12 - 1 tokens); the short one holds 1 block until
    # it stops at its first token, so 5 blocks are enough only if that block comes back
    got = run(model, [long, short], new=12, num_blocks=5, eos_token_ids=[stopper])
    assert got[1].tokens == [stopper] and got[1].finish_reason == "eos"
    assert got[0].tokens == alone and got[0].finish_reason == "length"
    assert blocks_needed([6], 12, 4) == 5
    with pytest.raises(ValueError, match=r"the cache is full: sequence \d needs a block for its token \d+ and all 5 blocks"):
        run(model, [short, long], new=12, num_blocks=5)


def test_bad_prompts_are_one_line(seed):
    model = tiny_decoder(seed)
    with pytest.raises(ValueError, match=r"prompt 1 has 13 tokens, expected at most 12 \(the cache's capacity: 3 "
                                         r"blocks of 4 tokens\)"):
        run(model, [[1, 2], [3] * 13], num_blocks=3)
    with pytest.raises(ValueError, match="prompt 0 has 0 tokens, expected at least 1"):
        run(model, [[]])
    with pytest.raises(ValueError, match="prompt 0 has token id 61, expected ids in 0..60"):
        run(model, [[1, 61]])
    with pytest.raises(ValueError, match="max_new_tokens=0, expected an int >= 1"):
        run(model, [[1]], new=0)
    # the model's context: a sequence that reaches it stops
    got = run(model, [[1, 2, 3]], new=10, max_context=5)[0]
    assert len(got.tokens) == 3 and got.finish_reason == "length"


def test_stats_split_prefill_and_decode(seed):
    model = tiny_decoder(seed)
    stats = GenerationStats()
    run(model, [[1, 2, 3, 4, 5], [6, 7]], new=4, chunk_size=2, stats=stats)
    # steps 1-3 carry prompt tokens (2 + 2; 2 + the short one's first decode; 1 + 1), then decode steps of
    # 2, 1 and 1 tokens (the short sequence has its 4 tokens after the fourth step)
    assert stats.prefill_tokens == 4 + 3 + 2 and stats.decode_tokens == 2 + 1 + 1 and stats.steps == 6
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0


def test_greedy_and_top_p(gen):
    logits = torch.randn(50, generator=gen).numpy()
    logits[[7, 30]] = logits.max() + 1  # a tie: the lower id wins
    assert next_token(logits, SamplingParams(), None) == 7
    probs = top_p_probabilities(logits, 0.7, 0.6)
    full = np.exp(logits.astype(np.float64) / 0.7)
    full /= full.sum()
    order = np.argsort(-full, kind="stable")
    keep = order[:int(np.searchsorted(np.cumsum(full[order]), 0.6) + 1)]
    np.testing.assert_allclose(probs[keep], full[keep] / full[keep].sum(), rtol=1e-12)
    assert probs.sum() == pytest.approx(1.0) and np.count_nonzero(probs) == len(keep)
    rng = np.random.default_rng(0)
    params = SamplingParams(0.7, 0.6, 0)
    draws = np.bincount([next_token(logits, params, rng) for _ in range(4000)], minlength=50) / 4000
    assert set(np.flatnonzero(draws)) <= set(keep.tolist())
    np.testing.assert_allclose(draws[keep], probs[keep], atol=0.04)
    with pytest.raises(ValueError, match="top_p=0, expected a number in"):
        SamplingParams(1.0, 0)
    with pytest.raises(ValueError, match="temperature=-1, expected a finite number >= 0"):
        SamplingParams(-1)
