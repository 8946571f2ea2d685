"""Every number the command line takes, checked at the edge.

Commands declare their options with plain ``type=int`` / ``type=float`` (or :func:`count`); before
parsing, :func:`harden` swaps each of those for a checked type, so a value that is not finite, would
overflow a seed or a C ``int``, or is outside the option's range is refused by argparse with one
line naming the option, the value seen and the range expected. Ranges that differ from the default
ones are listed in :data:`RANGES`, by option name, in this one place.

Defaults: an int option is in [0, 2**31 - 1] (sizes, counts, ports and ids reach int32 tensors and C
APIs; none of them is negative); a float option is finite and in [0, 1e9] (seconds, GiB, bits,
percentages: 1e9 s is 31 years, and tritonserver's config takes microseconds in an int64).
"""

from __future__ import annotations

import argparse
import math

INT32_MAX = 2**31 - 1
FLOAT_MAX = 1e9


def _int(text: str, minimum: int, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int, expected an int in [{minimum}, {maximum}]") from None
    if not minimum <= value <= maximum:
        expected = f">= {minimum}" if maximum == INT32_MAX and value < minimum else f"in [{minimum}, {maximum}]"
        raise argparse.ArgumentTypeError(f"{value}, expected an int {expected}")
    return value


def integer(minimum: int = 0, maximum: int = INT32_MAX):
    """An argparse type: an int in [minimum, maximum]."""

    def parse(text: str) -> int:
        return _int(text, minimum, maximum)

    parse.__name__ = f"int in [{minimum}, {maximum}]"
    return parse


def count(minimum: int = 1, maximum: int = INT32_MAX):
    """An argparse type: an int >= ``minimum`` (counts: vectors, repeats, threads, tokens, ...)."""
    return integer(minimum, maximum)


def number(minimum: float = 0.0, maximum: float = FLOAT_MAX, *, above: bool = False):
    """An argparse type: a finite float in [minimum, maximum] ((minimum, maximum] when ``above``)."""
    low = "(" if above else "["

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number, expected a finite number in "
                                             f"{low}{minimum:g}, {maximum:g}]") from None
        if not math.isfinite(value) or not (value > minimum if above else value >= minimum) or value > maximum:
            raise argparse.ArgumentTypeError(f"{text}, expected a finite number in {low}{minimum:g}, {maximum:g}]")
        return value

    parse.__name__ = f"number in {low}{minimum:g}, {maximum:g}]"
    return parse


# Seeds are drawn into torch/numpy generators and stored (plus a layer index) in int attributes.
SEED = integer(0, INT32_MAX - 65536)

# Option (dest) -> its checked type, where the default range above is not the right one.
RANGES = {
    "seed": SEED,
    "timeout": number(0.0, above=True),          # fuzz: 0 or nan would turn hang detection off
    "max_growth": number(0.0, 10.0),             # soak: a fraction of the starting memory
    "idle_seconds": number(0.0, 1e7, above=True),
    "wait_timeout": number(0.0, 1e7, above=True),
    "drain_seconds": number(0.0, 1e7),
    "seconds": number(0.0, 1e7, above=True),
    "warmup": number(0.0, 1e7),
    "ppl_budget": number(0.0, 1e6, above=True),  # percent
    "memory_budget": number(0.0, 64.0, above=True),  # effective bits per coordinate
    "k_bits": integer(1, 8),
    "v_bits": integer(1, 8),
    "bits": integer(1, 8),
    "head_dim": integer(2, 1024),                # the kernels' largest D is 256; the reference's 1024
    "kv_budget_gib": number(0.0, 1 << 20, above=True),
    "kv_memory": number(0.0, 1 << 20, above=True),
}

# eval-ppl takes fractional widths (--k-bits 3.5 mixes two codebooks).
FLOAT_RANGES = {
    "k_bits": number(1.0, 8.0),
    "v_bits": number(1.0, 8.0),
}


def _checked(action: argparse.Action):
    if action.type is int and action.choices is not None:
        return integer(-INT32_MAX - 1)  # its choices say the rest
    if action.type is int:
        return RANGES.get(action.dest, integer())
    if action.type is float:
        return FLOAT_RANGES.get(action.dest) or RANGES.get(action.dest, number())
    return None


def harden(parser: argparse.ArgumentParser) -> None:
    """Replaces every plain ``int``/``float`` type of ``parser`` (and its subparsers) with a checked one.
    ``choices`` still apply after the type, so ``--bits`` keeps its own list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                harden(sub)
            continue
        checked = _checked(action)
        if checked is not None:
            action.type = checked


def available_memory() -> int:
    """Bytes this process could still allocate: MemAvailable of /proc/meminfo (physical pages only:
    a size past it would swap or be killed before it fails cleanly)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(what: str, nbytes: int) -> None:
    """Refuses, before allocating, a size that needs more memory than this machine has available;
    ``what`` names the options that set it and their values."""
    have = available_memory()
    if nbytes > have:
        raise ValueError(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory, this machine has "
                         f"{have / 2**30:.1f} GiB available: expected a smaller size")
