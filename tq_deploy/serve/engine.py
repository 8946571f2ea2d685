"""The LLM server's engine: one loop of continuous batching over a generation backend and its pool.

    engine = Engine(LLMSession("model.onnx", num_blocks=n), eos_token_ids=[2])
    handle = engine.submit(prompt_ids, max_tokens=64, sampling=SamplingParams(), sink=sink)
    ...                                   # sink.token(id) per new token, sink.finish(reason, error) once
    engine.cancel(handle.id)              # a client that went away

One thread runs the model; every other thread only queues requests and cancellations. Each step:

- requests that were cancelled or waited past ``wait_timeout_s`` leave (their blocks go back);
- waiting requests are admitted in arrival order while the pool can hold every admitted
  sequence at its longest (prompt + max_tokens, capped by the cache) and fewer than
  ``max_sequences`` run, so an admitted sequence never meets a full pool and nothing is preempted;
- every decoding sequence gives its one token, then prefilling sequences give their next prompt
  chunk (``chunk_size`` tokens, cut per sequence exactly as :func:`generate_ids` cuts them) while
  the step has room under ``step_tokens``; the first chunk always goes, so a long prompt advances
  every step and its chunks never stall the others' decode by more than one chunk;
- one model call on the packed rows (:func:`tq_deploy.runtime.generation.pack_step`); a sequence
  that ended its prompt or decoded samples its next token, which goes to its sink at once;
- a sequence that hits an end-of-sequence token, ``max_tokens``, the model's context or the
  cache's capacity (or whose sink asks to stop) leaves and frees its blocks in the same step.

Greedy tokens are the ones ``generate`` gives for the prompt alone: the chunks are the same, a
row's logits do not depend on the other rows of the step, and a request samples from its own
generator (``SamplingParams.generator(0)``, the stream of a one-prompt ``generate``).

Sequence ids are the engine's own (an unguessable ``secrets.token_hex`` per request); no client
input ever names a sequence.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tq_deploy.runtime.generation import DEFAULT_CHUNK_SIZE, pack_step
from tq_deploy.runtime.sampling import SamplingParams, next_token
from tq_deploy.runtime.block_pool import BlockPool


class ClientError(ValueError):
    """The request itself is wrong (HTTP 400, tritonserver INVALID_ARG): the message says what to change."""


class Unavailable(RuntimeError):
    """The server cannot take or finish the request now (HTTP 503, tritonserver UNAVAILABLE)."""


class Sink:
    """Where a request's output goes; called on the engine thread, so it must not block."""

    def token(self, token_id: int) -> bool:
        """A new token; return True to end the request here (finish reason "stop")."""
        return False

    def finish(self, reason: str, error: Exception | None = None) -> None:
        """Called once: reason "eos", "length", "stop", "cancelled" or "error" (then ``error`` says why)."""


@dataclass
class Handle:
    id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    sink: Sink
    arrived: float
    tokens: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of the sequence in the cache
    reserved: int = 0  # blocks promised to it at admission
    slot: int = -1  # its id in the pool
    rng: object = None
    cancelled: bool = False
    finish_reason: str | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0  # every request that left without an error, cancelled ones included
    cancelled: int = 0
    errors: int = 0
    peak_running: int = 0
    peak_blocks: int = 0


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Engine:
    """Continuous batching over ``backend`` (module docstring). ``start`` is called here."""

    def __init__(self, backend, eos_token_ids: Sequence[int] = (), *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 step_tokens: int | None = None, max_sequences: int = 256, max_waiting: int = 1024,
                 wait_timeout_s: float = 60.0, max_context: int | None = None, start: bool = True):
        step_tokens = 2 * chunk_size if step_tokens is None else step_tokens
        for name, value in (("chunk_size", chunk_size), ("step_tokens", step_tokens),
                            ("max_sequences", max_sequences), ("max_waiting", max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}, expected an int >= 1")
        if not (isinstance(wait_timeout_s, (int, float)) and 0 < wait_timeout_s < 1e6):
            raise ValueError(f"wait_timeout_s={wait_timeout_s!r}, expected a number of seconds in (0, 1e6)")
        self.backend = backend
        self.block_size, self.num_blocks = int(backend.block_size), int(backend.num_blocks)
        self.pool = BlockPool(self.num_blocks, self.block_size)
        self.capacity = self.num_blocks * self.block_size
        self.max_context = int(max_context) if max_context else None
        self.vocab_size = getattr(backend, "vocab_size", None)
        self.eos = {int(t) for t in eos_token_ids}
        self.chunk_size, self.step_tokens = chunk_size, step_tokens
        self.max_sequences, self.max_waiting, self.wait_timeout_s = max_sequences, max_waiting, float(wait_timeout_s)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._running: list[Handle] = []
        self._by_id: dict[str, Handle] = {}
        self._reserved = 0
        self._next_slot = 1
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tq-engine", daemon=True)
        if start:
            self._thread.start()

    # --- client side (any thread) ---------------------------------------------------------------

    def limit(self) -> tuple[int, str]:
        """The most tokens one sequence may hold and what sets it."""
        if self.max_context is not None and self.max_context < self.capacity:
            return self.max_context, "the model's context length"
        return self.capacity, f"the KV-cache pool ({self.num_blocks} blocks of {self.block_size} tokens)"

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: SamplingParams, sink: Sink) -> Handle:
        """Queue a request; ClientError when it can never run, Unavailable when the server is full or stopping."""
        ids = [int(t) for t in prompt]
        if not ids:
            raise ClientError("prompt has 0 tokens, expected at least 1")
        if self.vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ClientError(f"prompt has token id {bad[0]}, expected ids in 0..{self.vocab_size - 1}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ClientError(f"max_tokens={max_tokens!r}, expected an int >= 1")
        limit, what = self.limit()
        if len(ids) > limit:
            raise ClientError(f"prompt has {len(ids)} tokens, expected at most {limit} ({what})")
        handle = Handle("cmpl-" + secrets.token_hex(16), ids, max_tokens, sampling, sink, time.monotonic())
        handle.rng = sampling.generator(0)
        # the sequence at its longest: the last token sampled is never written to the cache
        handle.reserved = blocks_for(min(len(ids) + max_tokens - 1, limit), self.block_size)
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_waiting:
                raise Unavailable(f"{len(self._waiting)} requests are waiting already (the limit); retry later")
            self._waiting.append(handle)
            self._by_id[handle.id] = handle
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        """End a request (its client went away); False for an id that is not live."""
        with self._cond:
            handle = self._by_id.get(request_id)
            if handle is None:
                return False
            handle.cancelled = True
            self._cond.notify()
        return True

    def snapshot(self) -> dict:
        """Counts only (never a sequence's content or length): what /stats and the tests read."""
        with self._cond:
            s = self.stats
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "free_blocks": self.pool.free_blocks, "num_blocks": self.num_blocks,
                    "block_size": self.block_size, "peak_running": s.peak_running, "peak_blocks": s.peak_blocks,
                    "steps": s.steps, "finished": s.finished, "cancelled": s.cancelled, "errors": s.errors,
                    "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens}

    def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running and waiting ones finish for up to ``drain_timeout_s``,
        then end what is left with an Unavailable error and stop the loop."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + max(drain_timeout_s, 0.0)
        with self._cond:
            while (self._running or self._waiting) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # --- the engine thread ----------------------------------------------------------------------

    def _finish(self, handle: Handle, reason: str, error: Exception | None = None) -> None:
        """Called with the lock held: the request leaves, its blocks go back."""
        handle.finish_reason = reason
        if handle in self._running:
            self._running.remove(handle)
            self._reserved -= handle.reserved
            self.pool.end(handle.slot)
        elif handle in self._waiting:
            self._waiting.remove(handle)
        self._by_id.pop(handle.id, None)
        if reason == "error":
            self.stats.errors += 1
        else:
            self.stats.finished += 1
            self.stats.cancelled += reason == "cancelled"
        try:
            handle.sink.finish(reason, error)
        except Exception:  # noqa: BLE001 - one broken sink must not stop the others' engine
            pass
        self._cond.notify_all()

    def _admit(self, now: float) -> None:
        for handle in [h for h in list(self._waiting) + self._running if h.cancelled]:
            self._finish(handle, "cancelled")
        for handle in [h for h in self._waiting if now - h.arrived > self.wait_timeout_s]:
            self._finish(handle, "error", Unavailable(
                f"timed out after {self.wait_timeout_s:g} s waiting for KV-cache space ({handle.reserved} blocks "
                f"needed, {self.num_blocks - self._reserved} of {self.num_blocks} not promised); retry later"))
        if self._stopping:
            for handle in list(self._waiting) + list(self._running):
                self._finish(handle, "error", Unavailable("the server stopped before this request finished"))
            return
        while self._waiting and len(self._running) < self.max_sequences \
                and self._reserved + self._waiting[0].reserved <= self.num_blocks:
            handle = self._waiting.popleft()
            handle.slot, self._next_slot = self._next_slot, self._next_slot + 1
            self.pool.start(handle.slot)
            self._reserved += handle.reserved
            self._running.append(handle)
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))

    def _schedule(self) -> list[tuple[Handle, list[int]]]:
        batch, used, chunked = [], 0, False
        for handle in self._running:  # decodes first: one token each
            if handle.fed >= len(handle.prompt):
                batch.append((handle, handle.tokens[-1:]))
                used += 1
        for handle in self._running:
            if handle.fed < len(handle.prompt):
                chunk = handle.prompt[handle.fed:handle.fed + self.chunk_size]
                if chunked and used + len(chunk) > self.step_tokens:
                    break  # arrival order: a later prompt does not overtake an earlier one
                batch.append((handle, chunk))
                used += len(chunk)
                chunked = True
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit(time.monotonic())
                if self._stopping and not self._running and not self._waiting:
                    return
                if not self._running:
                    self._cond.wait(0.1 if self._waiting else 0.5)
                    continue
                batch = self._schedule()
                rows = []
                for handle, tokens in batch:
                    state = self.pool.get(handle.slot)
                    first = handle.fed
                    for _ in tokens:
                        self.pool.reserve(state)  # never full: admission promised these blocks
                        self.pool.commit(state)
                    rows.append((tokens, first, list(state.blocks)))
                self.stats.peak_blocks = max(self.stats.peak_blocks, self.num_blocks - self.pool.free_blocks)
            try:
                logits = self.backend.step(pack_step(rows, self.block_size))
                if logits.shape[0] != len(batch):
                    raise RuntimeError(f"backend returned {logits.shape[0]} logits rows, expected {len(batch)}")
            except Exception as err:  # noqa: BLE001 - the step's requests fail, the server goes on
                with self._cond:
                    for handle, _ in batch:
                        self._finish(handle, "error", RuntimeError(f"model step failed: {type(err).__name__}: {err}"))
                continue
            with self._cond:
                self.stats.steps += 1
                for (handle, tokens), row in zip(batch, logits):
                    prefill = handle.fed < len(handle.prompt)
                    handle.fed += len(tokens)
                    if prefill:
                        self.stats.prompt_tokens += len(tokens)
                    if handle.fed < len(handle.prompt) or handle.finish_reason is not None:
                        continue
                    try:
                        token = next_token(row, handle.sampling, handle.rng)
                    except ValueError as err:
                        self._finish(handle, "error", RuntimeError(str(err)))
                        continue
                    handle.tokens.append(token)
                    self.stats.generated_tokens += 1
                    try:
                        stop = bool(handle.sink.token(token))
                    except Exception as err:  # noqa: BLE001
                        self._finish(handle, "error", err)
                        continue
                    limit, _ = self.limit()
                    if token in self.eos:
                        self._finish(handle, "eos")
                    elif stop:
                        self._finish(handle, "stop")
                    elif len(handle.tokens) >= handle.max_tokens or handle.fed >= limit:
                        self._finish(handle, "length")


@dataclass(frozen=True)
class PoolSize:
    """The pool --kv-memory buys, against an fp16 cache of the same model in the same memory."""

    num_blocks: int
    block_size: int
    block_bytes: int  # every layer's codes and norms of one block
    fp16_token_bytes: int  # keys and values of one token in fp16, every layer

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def fp16_tokens(self) -> int:
        return self.num_blocks * self.block_bytes // self.fp16_token_bytes

    def describe(self) -> str:
        gib = self.num_blocks * self.block_bytes / 2**30
        return (f"KV pool {gib:.3g} GiB: {self.num_blocks} blocks x {self.block_size} = {self.tokens} tokens "
                f"(an fp16 cache holds {self.fp16_tokens} tokens in it, {self.tokens / max(self.fp16_tokens, 1):.2f}x)")


def pool_size(model, kv_memory_gib: float) -> PoolSize:
    """The pool of an exported LLM (path or ModelProto) in ``kv_memory_gib`` GiB, from its graph's cache
    inputs ``[N, B, ...]`` (ValueError naming --kv-memory when not even one block fits)."""
    import onnx

    from tq_deploy.runtime.decode_session import CACHE_NAMES
    from tq_deploy.runtime.llm_session import load_llm_metadata

    proto, config = load_llm_metadata(model)
    block_bytes, block_size = 0, None
    for value in proto.graph.input:
        if value.name.partition(".")[0] in CACHE_NAMES:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            block_size = dims[1]
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
            block_bytes += int(np.prod(dims[1:])) * itemsize
    fp16 = 2 * 2 * int(config["num_layers"]) * int(config["num_kv_heads"]) * int(config["head_dim"])
    if isinstance(kv_memory_gib, bool) or not isinstance(kv_memory_gib, (int, float)) \
            or not 0 < kv_memory_gib < 1e5:
        raise ValueError(f"--kv-memory {kv_memory_gib!r}, expected a number of GiB in (0, 1e5)")
    blocks = int(kv_memory_gib * 2**30 // block_bytes)
    if blocks < 1:
        raise ValueError(f"--kv-memory {kv_memory_gib:g} GiB holds no cache block ({block_bytes} bytes each), "
                         "expected more memory")
    return PoolSize(blocks, int(block_size), block_bytes, fp16)

