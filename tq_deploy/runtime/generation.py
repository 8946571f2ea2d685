"""The generation loop of the exported LLM: chunked prefill, then decode, over a paged cache.

    backend = LLMSession("model.onnx", num_blocks=256)         # or ReferenceBackend(decoder, ...)
    results = generate_ids(backend, [[1, 2, 3], [4, 5]], max_new_tokens=16)

One step is one call of the model on packed rows (docs of LLM_INTERFACE: ``input_ids``,
``positions``, ``slot_mapping``, ``query_start``, ``block_tables``, ``context_lens``,
``logits_index``). Every live sequence puts into each step either its next prompt chunk (at most
``chunk_size`` tokens) or, once its prompt is in the cache, the token it sampled last; a sequence
whose step ends its prompt or decodes samples from the logits of its last row. Chunks are cut per
sequence, so a prompt goes through the same chunks whether it runs alone or in a batch, and
batching changes nothing but the packing. A sequence stops at an end-of-sequence token or after
``max_new_tokens``, and its cache blocks go back to the pool then; blocks are taken from the pool
as a sequence's tokens cross block boundaries (:class:`tq_deploy.runtime.block_pool.BlockPool`).

A backend is anything with ``block_size``, ``num_blocks`` and ``step(StepInputs) -> logits
[R, V]`` float32 that keeps its caches between calls: the ONNX Runtime session
(:mod:`tq_deploy.runtime.llm_session`) and the PyTorch reference decoder
(:mod:`tq_deploy.runtime.reference_backend`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tq_deploy.runtime.sampling import SamplingParams, next_token
from tq_deploy.runtime.block_pool import BlockPool, PoolFullError

DEFAULT_CHUNK_SIZE = 256


@dataclass
class StepInputs:
    """The packed inputs of one model call (the interface's names and dtypes)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start: np.ndarray  # [S+1] int32
    block_tables: np.ndarray  # [S, M] int32
    context_lens: np.ndarray  # [S] int32
    logits_index: np.ndarray  # [R] int64

    NAMES = ("input_ids", "positions", "slot_mapping", "query_start", "block_tables", "context_lens",
             "logits_index")

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.NAMES}


def pack_step(rows: Sequence[tuple[Sequence[int], int, list[int]]], block_size: int,
              logits_rows: str = "last") -> StepInputs:
    """StepInputs of sequences given as (new token ids, position of the first, the sequence's
    cache blocks): each sequence's tokens are the last ones of its context, their slots follow
    from the blocks. ``logits_rows``: "last" (each sequence's last row) or "all" (every row)."""
    ids, positions, slots, starts, lens = [], [], [], [0], []
    width = max((len(blocks) for _, _, blocks in rows), default=1)
    tables = np.zeros((len(rows), max(width, 1)), dtype=np.int32)
    for s, (tokens, first, blocks) in enumerate(rows):
        n = len(tokens)
        pos = np.arange(first, first + n, dtype=np.int64)
        table = np.asarray(blocks, dtype=np.int64)
        ids.append(np.asarray(tokens, dtype=np.int64))
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + n)
        lens.append(first + n)
        tables[s, :len(blocks)] = blocks
    query_start = np.asarray(starts, dtype=np.int32)
    if logits_rows == "last":
        index = query_start[1:].astype(np.int64) - 1
    elif logits_rows == "all":
        index = np.arange(starts[-1], dtype=np.int64)
    else:
        raise ValueError(f"logits_rows={logits_rows!r}, expected 'last' or 'all'")
    return StepInputs(np.concatenate(ids), np.concatenate(positions), np.concatenate(slots), query_start,
                      tables, np.asarray(lens, dtype=np.int32), index)


@dataclass
class Completion:
    """One prompt's result: the new token ids and why generation stopped ("eos" or "length")."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class GenerationStats:
    """Wall time split into steps that carried prompt tokens (prefill) and steps that only decoded."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: int = 0

    def rates(self) -> dict:
        def per_second(tokens, seconds):
            return tokens / seconds if seconds > 0 else float("nan")

        return {"prefill_tokens_per_s": per_second(self.prefill_tokens, self.prefill_seconds),
                "decode_tokens_per_s": per_second(self.decode_tokens, self.decode_seconds)}


@dataclass
class _Live:
    index: int
    prompt: list[int]
    fed: int  # tokens of the sequence in the cache (prompt, then generated)
    completion: Completion
    rng: object
    blocks: object  # the pool's SequenceState


def check_prompts(prompts, capacity: int, vocab_size: int | None, limit: str = "the cache's capacity") -> list[list[int]]:
    """Token id lists of the prompts; one that is empty, out of the vocabulary or longer than the
    cache holds for one sequence is a ValueError naming it."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts={prompts!r:.80}, expected a non-empty list of token id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in np.asarray(prompt, dtype=np.int64).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} has 0 tokens, expected at least 1")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(t for t in ids if t < 0 or t >= vocab_size)
            raise ValueError(f"prompt {i} has token id {bad}, expected ids in 0..{vocab_size - 1}")
        if len(ids) > capacity:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, expected at most {capacity} ({limit})")
        checked.append(ids)
    return checked


def blocks_needed(prompt_lengths: Sequence[int], max_new_tokens: int, block_size: int) -> int:
    """Cache blocks that hold every sequence at its longest (prompt + max_new_tokens - 1 cached
    tokens: the last sampled token is never written)."""
    return sum(-(-(n + max_new_tokens - 1) // block_size) for n in prompt_lengths)


def generate_ids(backend, prompts, max_new_tokens: int = 32, sampling: SamplingParams | None = None,
                 eos_token_ids: Sequence[int] = (), chunk_size: int = DEFAULT_CHUNK_SIZE,
                 stream: Callable[[int, int], None] | None = None, stats: GenerationStats | None = None,
                 max_context: int | None = None) -> list[Completion]:
    """Generate for every prompt (lists of token ids) on ``backend``; ``stream(i, token)`` is
    called for each token of prompt i as it is made. ``max_context`` caps a sequence's tokens
    (the model's context length): a prompt longer is an error, a sequence that reaches it stops
    ("length"). See the module docstring."""
    sampling = sampling or SamplingParams()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}, expected an int >= 1")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}, expected an int >= 1")
    block_size, num_blocks = int(backend.block_size), int(backend.num_blocks)
    capacity, limit = num_blocks * block_size, f"the cache's capacity: {num_blocks} blocks of {block_size} tokens"
    if max_context is not None and max_context < capacity:
        capacity, limit = int(max_context), "the model's context length"
    prompts = check_prompts(prompts, capacity, getattr(backend, "vocab_size", None), limit)
    eos = {int(t) for t in eos_token_ids}
    stats = stats if stats is not None else GenerationStats()
    pool = BlockPool(num_blocks, block_size)
    live = [_Live(i, p, 0, Completion(len(p)), sampling.generator(i), pool.start(i)) for i, p in enumerate(prompts)]
    done = []
    try:
        while live:
            rows, prefill = [], False
            for seq in live:
                if seq.fed < len(seq.prompt):
                    tokens = seq.prompt[seq.fed:seq.fed + chunk_size]
                    prefill = True
                else:
                    tokens = seq.completion.tokens[-1:]
                first = seq.fed
                for _ in tokens:
                    _reserve(pool, seq)
                rows.append((tokens, first, seq.blocks.blocks))
                seq.fed += len(tokens)
            step = pack_step(rows, block_size)
            start = time.perf_counter()
            logits = backend.step(step)
            seconds = time.perf_counter() - start
            stats.steps += 1
            if prefill:
                stats.prefill_tokens += int(step.input_ids.shape[0])
                stats.prefill_seconds += seconds
            else:
                stats.decode_tokens += int(step.input_ids.shape[0])
                stats.decode_seconds += seconds
            if logits.shape[0] != len(live):
                raise RuntimeError(f"backend returned logits of shape {logits.shape}, expected {len(live)} rows")
            still = []
            for seq, row in zip(live, logits):
                if seq.fed < len(seq.prompt):  # mid-prompt: its logits are not needed yet
                    still.append(seq)
                    continue
                token = next_token(row, sampling, seq.rng)
                seq.completion.tokens.append(token)
                if stream is not None:
                    stream(seq.index, token)
                if token in eos or len(seq.completion.tokens) >= max_new_tokens or seq.fed >= capacity:
                    seq.completion.finish_reason = "eos" if token in eos else "length"
                    pool.end(seq.index)
                    done.append(seq)
                else:
                    still.append(seq)
            live = still
    finally:
        for seq in live:
            pool.end(seq.index)
    done.sort(key=lambda s: s.index)
    return [s.completion for s in done]


def _reserve(pool: BlockPool, seq: _Live) -> None:
    try:
        pool.reserve(seq.blocks)
    except PoolFullError:
        raise ValueError(f"the cache is full: sequence {seq.index} needs a block for its token {seq.blocks.length} "
                         f"and all {pool.num_blocks} blocks of {pool.block_size} tokens are taken; expected "
                         "num_blocks to hold every sequence (blocks_needed)") from None
    pool.commit(seq.blocks)
