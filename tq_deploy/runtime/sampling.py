"""Choosing the next token from a row of logits: greedy, or temperature and top-p with a seed.

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    rng = params.generator(sequence_index)      # one stream per sequence
    token = next_token(logits_row, params, rng)

Greedy (temperature 0) takes the largest logit, the lowest token id on a tie. Sampling divides
the logits by the temperature, keeps the smallest set of most likely tokens whose probability
reaches top_p (nucleus sampling; the token that crosses top_p is kept), renormalizes and draws
one with a single uniform number from the sequence's own generator. Sequence i of a seeded run
draws from ``numpy.random.default_rng((seed, i))``: the same seed gives the same tokens, and a
sequence's draws do not depend on which other sequences share its batch. The arithmetic is
float64 on the host, so the choice does not depend on the backend beyond its logits.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed per run (sampling only)

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r}, expected a finite number >= 0 (0 is greedy)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r}, expected a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ValueError(f"seed={self.seed!r}, expected an int >= 0 or None")
        if self.seed is None and t > 0:
            object.__setattr__(self, "seed", secrets.randbits(63))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, sequence_index: int) -> np.random.Generator | None:
        """The random stream of sequence ``sequence_index`` (None when greedy)."""
        return None if self.greedy else np.random.default_rng((self.seed, sequence_index))


def top_p_probabilities(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The distribution sampling draws from: softmax(logits / temperature) restricted to the
    nucleus of mass ``top_p`` and renormalized (float64, zero outside the nucleus)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if not np.all(np.isfinite(z)):
        raise ValueError(f"logits have {int(np.sum(~np.isfinite(z)))} non-finite values, expected finite logits")
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs  # mass of the more likely tokens
        dropped = order[before >= top_p]
        probs[dropped] = 0.0
        probs /= probs.sum()
    return probs


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token id from one row of logits [V]."""
    if params.greedy:
        row = np.asarray(logits)
        if not np.all(np.isfinite(row)):
            raise ValueError(f"logits have {int(np.sum(~np.isfinite(row)))} non-finite values, "
                             "expected finite logits")
        return int(np.argmax(row))
    probs = top_p_probabilities(logits, params.temperature, params.top_p)
    cumulative = np.cumsum(probs)
    u = rng.random() * cumulative[-1]
    # the first token whose cumulative mass passes u; a token of probability 0 is never chosen
    return int(min(np.searchsorted(cumulative, u, side="right"), np.flatnonzero(probs)[-1]))
