"""One paged KV-cache pool shared by every sequence a server holds.

The pool hands out block indices of the resident cache (``DecodeSession``'s ``[N, B, ...]``
tensors). A sequence gets its first block when it stores its first token and one more each time
it crosses a block boundary; ending it returns all of them. Nothing here touches the cache
bytes: a freed block keeps stale codes, which no one reads, because attention only reads a
sequence's own first ``context_len`` slots.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


class PoolFullError(RuntimeError):
    """No free block for a token that needs one."""


class SequenceLimitError(RuntimeError):
    """A sequence would grow beyond the per-sequence token limit."""


@dataclass
class SequenceState:
    sequence_id: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens stored; the next token has position == length
    last_used: float = 0.0


class BlockPool:
    """Block allocator and per-sequence block tables (module docstring).

    ``max_tokens`` caps one sequence (None: only the pool's size limits it), so that one runaway
    sequence cannot take every block.
    """

    def __init__(self, num_blocks: int, block_size: int, max_tokens: int | None = None):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}, expected an int >= 1")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r}, expected an int >= 1 or None")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_tokens = max_tokens
        self._free: deque[int] = deque(range(num_blocks))
        self.sequences: dict[int, SequenceState] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, sequence_id: int) -> bool:
        return sequence_id in self.sequences

    def start(self, sequence_id: int, now: float | None = None) -> SequenceState:
        """A new, empty sequence; an active one with the same id is ended first (tritonserver does the
        same when a START arrives for a sequence that never sent its END)."""
        self.end(sequence_id)
        state = SequenceState(sequence_id, last_used=time.monotonic() if now is None else now)
        self.sequences[sequence_id] = state
        return state

    def get(self, sequence_id: int) -> SequenceState | None:
        return self.sequences.get(sequence_id)

    def reserve(self, state: SequenceState) -> tuple[int, int | None]:
        """The cache slot of the sequence's next token, and the block taken for it (None when the
        token fits in a block the sequence already holds). Raises PoolFullError or
        SequenceLimitError and changes nothing when the token cannot be stored."""
        position = state.length
        if self.max_tokens is not None and position >= self.max_tokens:
            raise SequenceLimitError(
                f"sequence_id={state.sequence_id} holds {position} tokens, the per-sequence limit "
                f"(max_tokens={self.max_tokens}); end it")
        index, offset = divmod(position, self.block_size)
        taken = None
        if index == len(state.blocks):
            if not self._free:
                raise PoolFullError(
                    f"KV-cache pool full: sequence_id={state.sequence_id} needs a block for token {position} "
                    f"and 0 of {self.num_blocks} blocks are free; end finished sequences or give the "
                    "server more blocks (--num-blocks)")
            taken = self._free.popleft()
            state.blocks.append(taken)
        return state.blocks[index] * self.block_size + offset, taken

    def commit(self, state: SequenceState, now: float | None = None) -> None:
        """The token reserved last was written: the sequence now holds one more."""
        state.length += 1
        state.last_used = time.monotonic() if now is None else now

    def release(self, state: SequenceState, block: int | None) -> None:
        """Undo :meth:`reserve` for a token that was not written."""
        if block is not None and state.blocks and state.blocks[-1] == block:
            state.blocks.pop()
            self._free.append(block)

    def end(self, sequence_id: int) -> int:
        """Forget the sequence and return its blocks; the number returned (0 for an unknown id)."""
        state = self.sequences.pop(sequence_id, None)
        if state is None:
            return 0
        self._free.extend(state.blocks)
        count = len(state.blocks)
        state.blocks = []
        return count

    def end_idle(self, idle_seconds: float, now: float | None = None) -> list[int]:
        """End every sequence unused for more than ``idle_seconds`` (a client that vanished without
        sending its END); the ids ended."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self.sequences.items() if now - s.last_used > idle_seconds]
        for sid in stale:
            self.end(sid)
        return stale
