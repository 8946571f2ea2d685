"""Decode steps of many sequences batched into one run of the exported model over a shared pool.

    decoder = PagedDecoder(DecodeSession("model.onnx", num_blocks=1024), BlockPool(1024, 16))
    results = decoder.step([StepRequest(sequence_id=7, start=True, end=False, hidden=h, positions=p), ...])

Each request is one token of one sequence: ``hidden`` [1, H] float32 and ``positions`` [1] (or
[1, 1]) int64, which must equal the number of tokens the sequence already holds. The decoder
checks every request on its own, so a bad one gets its own error and the others still run; the
good ones become one call of the model with S rows (``slot_mapping``, ``block_tables`` and
``context_lens`` come from the pool). Two requests of one sequence in a batch run in two
rounds, in order. A request flagged ``end`` frees its sequence's blocks whatever its outcome,
because the server forgets the sequence after it either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from tq_deploy.runtime.block_pool import BlockPool, PoolFullError, SequenceLimitError


@dataclass
class StepRequest:
    sequence_id: int
    start: bool
    end: bool
    hidden: np.ndarray | None
    positions: np.ndarray | None
    error: str | None = None  # set by the caller when the request could not even be read


INVALID, UNAVAILABLE, INTERNAL = "invalid", "unavailable", "internal"


@dataclass
class StepResult:
    out: np.ndarray | None = None  # [H] float32
    error: str | None = None
    # INVALID: the request is wrong (retrying it cannot help); UNAVAILABLE: no room in the pool
    # now (retry after other sequences end); INTERNAL: the model run failed.
    kind: str | None = None

    def fail(self, message: str, kind: str = INVALID) -> None:
        self.error, self.kind = message, kind


class PagedDecoder:
    """Runs batches of :class:`StepRequest` (module docstring). ``session`` is a
    :class:`~tq_deploy.runtime.decode_session.DecodeSession` (anything with ``config`` and
    ``run(hidden, positions, slot_mapping, block_tables, context_lens)``)."""

    def __init__(self, session, pool: BlockPool, idle_seconds: float | None = None):
        config = session.config
        if pool.block_size != config["block_size"]:
            raise ValueError(f"pool block_size={pool.block_size}, expected the model's block_size={config['block_size']}")
        if pool.num_blocks > session.num_blocks:
            raise ValueError(f"pool num_blocks={pool.num_blocks}, expected <= the session's cache "
                             f"num_blocks={session.num_blocks}")
        self.session = session
        self.pool = pool
        self.hidden_size = int(config["hidden_size"])
        self.idle_seconds = idle_seconds
        self.steps = 0  # model runs
        self.tokens = 0  # tokens decoded

    def _check(self, r: StepRequest) -> str | None:
        """Why the request's tensors are unusable (None when they are fine)."""
        h = self.hidden_size
        if r.hidden is None:
            return "input 'hidden' is missing, expected float32 [1, %d]" % h
        if r.positions is None:
            return "input 'positions' is missing, expected int64 [1]"
        hidden, positions = r.hidden, r.positions
        if hidden.dtype != np.float32 or hidden.shape != (1, h):
            return (f"hidden is {hidden.dtype} {list(hidden.shape)}, expected float32 [1, {h}] "
                    "(one token per sequence per request)")
        if not np.all(np.isfinite(hidden)):
            return "hidden has non-finite values (NaN or inf), expected finite numbers"
        if positions.dtype != np.int64 or positions.size != 1:
            return f"positions is {positions.dtype} {list(positions.shape)}, expected int64 [1]"
        return None

    def step(self, requests: list[StepRequest]) -> list[StepResult]:
        now = time.monotonic()
        if self.idle_seconds is not None:
            self.pool.end_idle(self.idle_seconds, now)
        results = [StepResult() for _ in requests]
        pending = []
        for i, r in enumerate(requests):
            problem = r.error or self._check(r)
            if problem is None and r.start:
                self.pool.start(r.sequence_id, now)
            elif problem is None and r.sequence_id not in self.pool:
                problem = (f"sequence_id={r.sequence_id} is not active: it never started (send sequence_start "
                           "with its first token), it ended, its start was refused, or it was idle too long")
            if problem is not None:
                results[i].fail(problem)
            else:
                pending.append(i)
        while pending:
            seen, this_round, later = set(), [], []
            for i in pending:
                (later if requests[i].sequence_id in seen else this_round).append(i)
                seen.add(requests[i].sequence_id)
            self._run_round(requests, results, this_round, now)
            pending = later
        for r in requests:
            if r.end:
                self.pool.end(r.sequence_id)
        return results

    def _run_round(self, requests, results, indices, now) -> None:
        rows = []  # (request index, state, slot, block taken)
        for i in indices:
            r = requests[i]
            state = self.pool.get(r.sequence_id)
            if state is None:  # ended by an earlier request of this batch
                results[i].fail(f"sequence_id={r.sequence_id} is not active: an earlier request of it ended it")
                continue
            position = int(r.positions.reshape(-1)[0])
            if position != state.length:
                results[i].fail(f"positions={position} for sequence_id={r.sequence_id}, expected {state.length} "
                                "(the tokens it holds; one request per token, in order)")
                continue
            try:
                slot, block = self.pool.reserve(state)
            except (PoolFullError, SequenceLimitError) as err:
                results[i].fail(str(err), UNAVAILABLE)
                if state.length == 0:  # a refused start leaves nothing behind
                    self.pool.end(r.sequence_id)
                continue
            rows.append((i, state, slot, block))
        if not rows:
            return
        width = max(len(state.blocks) for _, state, _, _ in rows)
        block_tables = np.zeros((len(rows), width), np.int32)
        for k, (_, state, _, _) in enumerate(rows):
            block_tables[k, : len(state.blocks)] = state.blocks
        hidden = np.concatenate([requests[i].hidden for i, _, _, _ in rows], axis=0)
        positions = np.array([state.length for _, state, _, _ in rows], np.int64)
        slots = np.array([slot for _, _, slot, _ in rows], np.int64)
        try:
            out = self.session.run(hidden, positions, slots, block_tables, (positions + 1).astype(np.int32))
        except Exception as err:  # noqa: BLE001 - the batch's clients get the reason; the server keeps serving
            for i, state, _, block in rows:
                self.pool.release(state, block)
                results[i].fail(f"decode step failed: {' '.join(str(err).split())}", INTERNAL)
            return
        self.steps += 1
        self.tokens += len(rows)
        for k, (i, state, _, _) in enumerate(rows):
            self.pool.commit(state, now)
            results[i].out = out[k]
