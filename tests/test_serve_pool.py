"""The serving pool and the batching decoder, in process: the block pool's bookkeeping, and
PagedDecoder over a real ONNX Runtime DecodeSession against the PyTorch reference (the same code
the tritonserver model runs, without the server)."""

from __future__ import annotations

import numpy as np
import pytest
from serve_support import CONFIG, assert_matches_reference, exported_model, library_or_skip

from tq_deploy.serve.decoder import INVALID, UNAVAILABLE, PagedDecoder, StepRequest
from tq_deploy.runtime.block_pool import BlockPool, PoolFullError, SequenceLimitError

pytest.importorskip("onnxruntime")
H = CONFIG.hidden_size
B = CONFIG.block_size


# ---------------------------------------------------------------- pool bookkeeping

def test_blocks_are_taken_at_boundaries_and_returned_on_end():
    pool = BlockPool(num_blocks=5, block_size=4)
    a = pool.start(1)
    slots = []
    for _ in range(9):  # 9 tokens: blocks for tokens 0, 4, 8
        slot, _ = pool.reserve(a)
        pool.commit(a)
        slots.append(slot)
    assert len(a.blocks) == 3 and pool.free_blocks == 2
    assert slots == [a.blocks[t // 4] * 4 + t % 4 for t in range(9)]
    assert len(set(slots)) == 9
    assert pool.end(1) == 3 and pool.free_blocks == 5 and 1 not in pool
    assert pool.end(1) == 0  # a second end is harmless


def test_full_pool_refuses_and_changes_nothing():
    pool = BlockPool(num_blocks=2, block_size=2)
    a, b = pool.start(1), pool.start(2)
    for s in (a, b):
        pool.reserve(s)
        pool.commit(s)
    pool.reserve(a)  # token 1 of a fits in its block
    pool.commit(a)
    with pytest.raises(PoolFullError, match=r"sequence_id=1 needs a block for token 2 and 0 of 2 blocks are free"):
        pool.reserve(a)
    assert a.length == 2 and len(a.blocks) == 1 and pool.free_blocks == 0
    pool.end(2)
    slot, taken = pool.reserve(a)
    assert taken is not None and slot == taken * 2


def test_release_undoes_reserve_and_limits_hold():
    pool = BlockPool(num_blocks=3, block_size=2, max_tokens=3)
    a = pool.start(7)
    _, taken = pool.reserve(a)
    pool.release(a, taken)
    assert pool.free_blocks == 3 and a.blocks == []
    for _ in range(3):
        pool.reserve(a)
        pool.commit(a)
    with pytest.raises(SequenceLimitError, match=r"sequence_id=7 holds 3 tokens.*max_tokens=3"):
        pool.reserve(a)


def test_restart_and_idle_sequences_free_their_blocks():
    pool = BlockPool(num_blocks=4, block_size=1)
    a = pool.start(1, now=0.0)
    for _ in range(3):
        pool.reserve(a)
        pool.commit(a, now=0.0)
    b = pool.start(1, now=1.0)  # a START for an active id begins a new sequence
    assert pool.free_blocks == 4 and b.length == 0 and pool.get(1) is b
    pool.reserve(b)
    pool.commit(b, now=1.0)
    c = pool.start(2, now=5.0)
    assert pool.end_idle(3.0, now=5.5) == [1]
    assert pool.get(2) is c and pool.free_blocks == 4


@pytest.mark.parametrize("bad", [dict(num_blocks=0, block_size=4), dict(num_blocks=4, block_size=0),
                                 dict(num_blocks=4, block_size=4, max_tokens=0)])
def test_bad_pool_arguments(bad):
    with pytest.raises(ValueError, match="expected an int >= 1"):
        BlockPool(**bad)


# ---------------------------------------------------------------- decoder over ONNX Runtime

@pytest.fixture(scope="module")
def session():
    from tq_deploy.runtime.decode_session import DecodeSession

    library_or_skip()
    return DecodeSession(exported_model(), num_blocks=6, threads=1)


def _request(sid, position, hidden, start=False, end=False):
    return StepRequest(sid, start, end, hidden.reshape(1, H).astype(np.float32), np.array([[position]], np.int64))


def test_decoder_batches_sequences_and_matches_reference(session, gen):
    """Three sequences of different lengths, stepped together (fewer and fewer as they end),
    with a bad request in every batch: each good row equals its own reference run."""
    decoder = PagedDecoder(session, BlockPool(6, B))
    lengths = {11: 3, 12: B + 2, 13: 2 * B}  # 1 + 2 + 2 = 5 blocks of 6
    hiddens = {sid: [np.random.default_rng(sid + gen.initial_seed()).standard_normal(H).astype(np.float32)
                     for _ in range(n)] for sid, n in lengths.items()}
    got = {sid: [] for sid in lengths}
    for t in range(max(lengths.values())):
        batch = [_request(sid, t, hiddens[sid][t], start=t == 0, end=t == n - 1)
                 for sid, n in lengths.items() if t < n]
        batch.insert(1, _request(99, 0, np.full(H, np.nan)))  # not started, and NaN
        results = decoder.step(batch)
        assert results[1].kind == INVALID and results[1].out is None
        good = [r for k, r in enumerate(results) if k != 1]
        assert all(r.error is None for r in good), [r.error for r in good]
        for r, req in zip(good, [b for k, b in enumerate(batch) if k != 1]):
            got[req.sequence_id].append(r.out)
    assert decoder.pool.free_blocks == 6 and not decoder.pool.sequences
    assert decoder.steps == max(lengths.values())
    for sid in lengths:
        assert_matches_reference(got[sid], hiddens[sid], f"sequence {sid}")


def test_decoder_errors_leave_the_sequence_as_it_was(session, gen):
    decoder = PagedDecoder(session, BlockPool(6, B))
    rng = np.random.default_rng(gen.initial_seed())
    hiddens = [rng.standard_normal(H).astype(np.float32) for _ in range(4)]
    outs = [decoder.step([_request(5, 0, hiddens[0], start=True)])[0].out]
    bad = {
        "position gap": _request(5, 2, hiddens[1]),
        "position repeat": _request(5, 0, hiddens[1]),
        "non-finite": _request(5, 1, np.full(H, np.inf)),
        "wrong width": StepRequest(5, False, False, np.zeros((1, H + 1), np.float32), np.array([[1]], np.int64)),
        "two tokens": StepRequest(5, False, False, np.zeros((2, H), np.float32), np.array([[1], [2]], np.int64)),
        "float64": StepRequest(5, False, False, np.zeros((1, H)), np.array([[1]], np.int64)),
        "positions int32": StepRequest(5, False, False, np.zeros((1, H), np.float32), np.array([[1]], np.int32)),
        "missing hidden": StepRequest(5, False, False, None, np.array([[1]], np.int64)),
    }
    messages = {name: decoder.step([r])[0] for name, r in bad.items()}
    assert all(m.kind == INVALID and m.out is None for m in messages.values())
    assert "positions=2 for sequence_id=5, expected 1" in messages["position gap"].error
    assert "non-finite" in messages["non-finite"].error
    assert f"expected float32 [1, {H}]" in messages["wrong width"].error
    assert "input 'hidden' is missing" in messages["missing hidden"].error
    # the sequence goes on from where it was, as if the bad requests never came
    for t in (1, 2, 3):
        outs.append(decoder.step([_request(5, t, hiddens[t], end=t == 3)])[0].out)
    assert_matches_reference(outs, hiddens)
    assert decoder.pool.free_blocks == 6


def test_decoder_full_pool_and_same_batch_duplicates(session, gen):
    decoder = PagedDecoder(session, BlockPool(2, B))
    rng = np.random.default_rng(gen.initial_seed())
    h = [rng.standard_normal(H).astype(np.float32) for _ in range(3)]
    # two tokens of sequence 1 in one batch run in two rounds, in order
    first = decoder.step([_request(1, 0, h[0], start=True), _request(1, 1, h[1]), _request(2, 0, h[2], start=True)])
    assert [r.error for r in first] == [None, None, None] and decoder.steps == 2
    assert_matches_reference([first[0].out, first[1].out], h[:2])
    refused = decoder.step([_request(3, 0, h[0], start=True)])[0]
    assert refused.kind == UNAVAILABLE and "pool full" in refused.error and 3 not in decoder.pool
    later = decoder.step([_request(3, 1, h[1])])[0]
    assert later.kind == INVALID and "sequence_id=3 is not active" in later.error
    # an END frees the blocks even when its own step is refused
    ended = decoder.step([_request(2, 5, h[1], end=True)])[0]
    assert ended.kind == INVALID and decoder.pool.free_blocks == 1
    assert decoder.step([_request(3, 0, h[0], start=True)])[0].error is None


def test_the_reference_comparison_forgives_rounding_ties_only(seed):
    """assert_matches_reference (serve_support) accepts outputs whose backend took the other code at a
    rounding tie, and nothing else: a code flipped far from its boundary fails it."""
    from serve_support import reference_outputs, rounding_ties

    rng = np.random.default_rng(seed)
    for _ in range(50):  # a sequence of 30 tokens holds a tie about every other draw
        hiddens = [rng.standard_normal(H).astype(np.float32) for _ in range(30)]
        ties = rounding_ties(hiddens)
        if ties:
            break
    else:
        pytest.fail("no rounding tie in 50 sequences of 30 tokens")
    position, kind, head, coordinate, code = ties[0]
    assert_matches_reference(reference_outputs(hiddens, {position: [(kind, head, coordinate, code)]}), hiddens)
    far = (coordinate + CONFIG.head_dim // 2) % CONFIG.head_dim  # an extreme code, which no tie is near
    wrong = reference_outputs(hiddens, {position: [(kind, head, far, 0)]})
    if np.allclose(np.stack(wrong), np.stack(reference_outputs(hiddens)), atol=1e-6):  # it was code 0 already
        wrong = reference_outputs(hiddens, {position: [(kind, head, far, (1 << getattr(CONFIG, f"{kind}_bits")) - 1)]})
    with pytest.raises(AssertionError, match="rounding ties taken the other way"):
        assert_matches_reference(wrong, hiddens)
