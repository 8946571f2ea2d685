"""Text requests of the LLM server: fields checked at the edge, tokens turned into text and stop strings.

Both front ends (the tritonserver model and the OpenAI-compatible HTTP app) read a request into a
:class:`TextRequest` with :func:`read_request`, which refuses a bad field with one line naming it
(:class:`~tq_deploy.serve.engine.ClientError`), and hand the engine a :class:`TextSink` that turns
the new tokens into whole characters and ends the request at a stop string (the stop string is
not part of the text, as the OpenAI API does it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tq_deploy.runtime.generate import TextStream
from tq_deploy.runtime.sampling import SamplingParams
from tq_deploy.serve.engine import ClientError, Sink

MAX_STOPS = 8
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1 << 20
MAX_SEED = 2**63 - 1


@dataclass
class TextRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False


def _number(name, value, kind, low, high, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ClientError(f"{name}={value!r:.60}, expected {'an integer' if kind is int else 'a number'} "
                          f"in {low}..{high}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ClientError(f"{name}={value!r:.60}, expected {'an integer' if kind is int else 'a number'} "
                          f"in {low}..{high}")
    return kind(value)


def _check_text(name: str, text: str) -> None:
    """JSON's \\uD800-style escapes can carry lone surrogates, which are no text: the tokenizer would fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ClientError(f"{name} has a lone surrogate {text[err.start]!r} at character {err.start}, "
                          "expected Unicode text") from None


def read_request(fields: dict, tokenize: Callable[[str], list[int]], max_tokens_limit: int,
                 default_max_tokens: int = 16) -> TextRequest:
    """The checked request of ``fields`` (prompt: text or a list of token ids; max_tokens,
    temperature, top_p, seed, stop, stream)."""
    prompt = fields.get("prompt")
    if isinstance(prompt, str):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ClientError(f"prompt has {len(prompt)} characters, expected at most {MAX_PROMPT_CHARS}")
        _check_text("prompt", prompt)
        ids = tokenize(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise ClientError(f"prompt={prompt!r:.60}, expected a string or a non-empty list of token ids")
    if not ids:
        raise ClientError("prompt has 0 tokens, expected at least 1")
    max_tokens = _number("max_tokens", fields.get("max_tokens"), int, 1, max_tokens_limit, default_max_tokens)
    temperature = _number("temperature", fields.get("temperature"), float, 0, 100, 0.0)
    top_p = _number("top_p", fields.get("top_p"), float, 0, 1, 1.0)
    if top_p == 0:
        raise ClientError("top_p=0, expected a number in (0, 1]")
    seed = _number("seed", fields.get("seed"), int, 0, MAX_SEED, None)
    stop = fields.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise ClientError(f"stop={fields.get('stop')!r:.60}, expected a string or a list of at most {MAX_STOPS} "
                          f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    for s in stop:
        _check_text("stop", s)
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise ClientError(f"stream={stream!r:.30}, expected true or false")
    return TextRequest(ids, max_tokens, SamplingParams(temperature, top_p, seed), list(stop), stream)


class TextSink(Sink):
    """Tokens to text pieces with stop strings (module docstring). ``emit(text, token_ids)`` gets each
    piece as it is made (text may be empty while a character is incomplete or a stop string may be
    starting); ``done(reason, error)`` once at the end, after the last piece."""

    def __init__(self, tokenizer, stop: list[str], emit: Callable[[str, list[int]], None],
                 done: Callable[[str, Exception | None], None]):
        self.stream = TextStream(tokenizer)
        self.stop = stop
        self.emit_piece, self.done = emit, done
        self.sent = 0  # characters of stream.text already emitted
        self.tokens: list[int] = []
        self.stopped = False
        self.held_ids: list[int] = []

    def token(self, token_id: int) -> bool:
        self.tokens.append(token_id)
        self.stream.add(token_id)
        self.held_ids.append(token_id)
        text = self.stream.text
        if self.stop:
            cut = min((i for i in (text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self._emit(text[self.sent:cut])
                self.stopped = True
                return True
            # hold back a tail that could be the start of a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            self._emit(text[self.sent:len(text) - hold])
        else:
            self._emit(text[self.sent:])
        return False

    def _emit(self, piece: str) -> None:
        self.sent += len(piece)
        ids, self.held_ids = self.held_ids, []
        self.emit_piece(piece, ids)

    def finish(self, reason: str, error: Exception | None = None) -> None:
        if reason in ("eos", "length") and not self.stopped:
            # what was held back: an incomplete character at the end, or a stop string's possible start
            text = self.stream.tokenizer.decode(self.stream.tokens, skip_special_tokens=True)
            rest = text[self.sent:] if len(text) > self.sent else ""
            if rest or self.held_ids:
                self._emit(rest)
        self.done(reason, error)

    @property
    def text(self) -> str:
        return self.stream.text[:self.sent]
