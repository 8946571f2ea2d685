"""tq_deploy.cli_checks on its own (fast): the checked argparse types, each range's edges, which
type harden() gives an option, and the memory check. tests/test_edge_checks.py runs the same checks
through the commands."""

from __future__ import annotations

import argparse

import pytest

from tq_deploy import cli_checks as cc

INT32_MAX = 2**31 - 1


def refused(parse, text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    return str(info.value)


def test_integer_range_and_messages():
    parse = cc.integer(3, 10)
    assert parse("3") == 3 and parse("10") == 10 and parse(" 7 ") == 7 and isinstance(parse("7"), int)
    assert parse.__name__ == "int in [3, 10]"
    assert refused(parse, "2") == "2, expected an int in [3, 10]"
    assert refused(parse, "11") == "11, expected an int in [3, 10]"
    assert refused(parse, "1.7") == "'1.7' is not an int, expected an int in [3, 10]"
    assert refused(parse, "nan") == "'nan' is not an int, expected an int in [3, 10]"
    default = cc.integer()
    assert default("0") == 0 and default(str(INT32_MAX)) == INT32_MAX
    assert refused(default, "-1") == "-1, expected an int >= 0"  # no upper bound worth naming
    assert refused(default, str(2**70)) == f"{2**70}, expected an int in [0, {INT32_MAX}]"
    assert refused(cc.integer(-5, 5), "-6") == "-6, expected an int in [-5, 5]"


def test_count_starts_at_one():
    parse = cc.count()
    assert parse("1") == 1 and parse(str(INT32_MAX)) == INT32_MAX
    assert refused(parse, "0") == "0, expected an int >= 1"
    assert cc.count(4, 9)("9") == 9 and refused(cc.count(4, 9), "3") == "3, expected an int in [4, 9]"


def test_number_range_and_messages():
    closed = cc.number(0.5, 2.0)
    assert closed("0.5") == 0.5 and closed("2") == 2.0 and closed("1e0") == 1.0
    assert closed.__name__ == "number in [0.5, 2]"
    assert refused(closed, "0.4") == "0.4, expected a finite number in [0.5, 2]"
    assert refused(closed, "2.01") == "2.01, expected a finite number in [0.5, 2]"
    assert refused(closed, "x") == "'x' is not a number, expected a finite number in [0.5, 2]"
    for bad in ("nan", "inf", "-inf", "1e400"):
        assert refused(closed, bad) == f"{bad}, expected a finite number in [0.5, 2]"
    above = cc.number(0.0, 3.0, above=True)
    assert above("1e-300") == 1e-300 and above("3") == 3.0
    assert refused(above, "0") == "0, expected a finite number in (0, 3]"
    assert above.__name__ == "number in (0, 3]"
    default = cc.number()
    assert default("0") == 0.0 and default("1e9") == 1e9
    assert refused(default, "1.5e9") == "1.5e9, expected a finite number in [0, 1e+09]"
    assert refused(default, "-0.1") == "-0.1, expected a finite number in [0, 1e+09]"


# option -> (smallest accepted, below it, largest accepted, above it); None where the range is open there
EDGES = {
    "seed": ("0", "-1", str(INT32_MAX - 65536), str(INT32_MAX - 65535)),
    "timeout": ("1e-9", "0", "1e9", "1.1e9"),
    "max_growth": ("0", "-0.01", "10", "10.5"),
    "idle_seconds": ("1e-9", "0", "1e7", "1.1e7"),
    "wait_timeout": ("1e-9", "0", "1e7", "1.1e7"),
    "drain_seconds": ("0", "-1e-9", "1e7", "1.1e7"),
    "seconds": ("1e-9", "0", "1e7", "1.1e7"),
    "warmup": ("0", "-1e-9", "1e7", "1.1e7"),
    "ppl_budget": ("1e-9", "0", "1e6", "1.1e6"),
    "memory_budget": ("1e-9", "0", "64", "64.5"),
    "k_bits": ("1", "0", "8", "9"),
    "v_bits": ("1", "0", "8", "9"),
    "bits": ("1", "0", "8", "9"),
    "head_dim": ("2", "1", "1024", "1025"),
    "kv_budget_gib": ("1e-9", "0", str(2**20), str(2**20 + 1)),
    "kv_memory": ("1e-9", "0", str(2**20), str(2**20 + 1)),
}
FLOAT_EDGES = {"k_bits": ("1", "0.99", "8", "8.01"), "v_bits": ("1", "0.99", "8", "8.01")}


def _type_of(dest: str, kind):
    parser = argparse.ArgumentParser()
    parser.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=kind)
    cc.harden(parser)
    return parser._actions[-1].type


@pytest.mark.parametrize("dest", sorted(EDGES))
def test_each_named_range_at_its_edges(dest):
    assert sorted(cc.RANGES) == sorted(EDGES)
    parse = cc.RANGES[dest]
    low, below, high, above = EDGES[dest]
    assert parse(low) == (int(low) if parse.__name__.startswith("int") else float(low))
    assert parse(high) == (int(high) if parse.__name__.startswith("int") else float(high))
    for bad in (below, above):
        refused(parse, bad)
    kind = int if parse.__name__.startswith("int") else float
    if dest not in cc.FLOAT_RANGES:
        assert _type_of(dest, kind) is parse  # harden gives the option its named range


@pytest.mark.parametrize("dest", sorted(FLOAT_EDGES))
def test_fractional_bit_widths(dest):
    assert sorted(cc.FLOAT_RANGES) == sorted(FLOAT_EDGES)
    parse = _type_of(dest, float)
    assert parse is cc.FLOAT_RANGES[dest]
    low, below, high, above = FLOAT_EDGES[dest]
    assert parse(low) == 1.0 and parse(high) == 8.0 and parse("3.5") == 3.5
    refused(parse, below)
    refused(parse, above)
    assert _type_of(dest, int) is cc.RANGES[dest]  # an int --k-bits keeps the int range


def test_harden_replaces_plain_types_only_and_reaches_subcommands():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--level", type=int, choices=[-3, 0, 5])
    parser.add_argument("--name", type=str)
    parser.add_argument("--flag", action="store_true")
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("run")
    child.add_argument("--repeat", type=int)
    child.add_argument("--seed", type=int)
    parser.add_argument("--after", type=int)  # an option after the subcommands is hardened too
    cc.harden(parser)
    args = parser.parse_args(["--count", "5", "--rate", "0.5", "--level", "-3", "--name", "n", "run", "--repeat",
                              "2", "--seed", "9"])
    assert (args.count, args.rate, args.level, args.name, args.repeat, args.seed) == (5, 0.5, -3, "n", 2, 9)
    types = {a.dest: a.type for a in parser._actions}
    assert types["name"] is str and types["flag"] is None and types["after"].__name__ == f"int in [0, {INT32_MAX}]"
    assert types["count"].__name__ == f"int in [0, {INT32_MAX}]"
    assert types["rate"].__name__ == "number in [0, 1e+09]"
    assert types["level"].__name__ == f"int in [{-INT32_MAX - 1}, {INT32_MAX}]"  # choices say the rest
    child_types = {a.dest: a.type for a in child._actions}
    assert child_types["repeat"].__name__ == f"int in [0, {INT32_MAX}]" and child_types["seed"] is cc.SEED
    for argv in (["--count", "-1"], ["--rate", "nan"], ["--level", "4"], ["run", "--seed", str(2**40)]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            if key == "MemAvailable":
                return int(value.split()[0]) * 1024
    raise AssertionError("no MemAvailable")


def test_available_memory_is_memavailable(monkeypatch):
    import io
    import os

    got = cc.available_memory()
    want = _meminfo_available()
    assert abs(got - want) < 0.1 * want + 2**28  # the real file (memory moves between the two reads)
    text = "MemTotal:       99999 kB\nMemFree:   5 kB\nMemAvailable:   12345 kB\n"
    monkeypatch.setattr(cc, "open", lambda path: io.StringIO(text), raising=False)
    assert cc.available_memory() == 12345 * 1024
    # no /proc/meminfo (or no MemAvailable line): the available physical pages
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(cc, "open", lambda path: io.StringIO("MemTotal: 1 kB\n"), raising=False)
    assert abs(cc.available_memory() - pages) < 0.1 * pages + 2**28

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(cc, "open", missing, raising=False)
    assert abs(cc.available_memory() - pages) < 0.1 * pages + 2**28


def test_check_memory_refuses_past_what_is_available(monkeypatch):
    monkeypatch.setattr(cc, "available_memory", lambda: 3 * 2**30)
    cc.check_memory("--x 1", 3 * 2**30)  # exactly what is there: accepted
    with pytest.raises(ValueError) as info:
        cc.check_memory("--num-blocks 1000000000", 3 * 2**30 + 1)
    assert str(info.value) == ("--num-blocks 1000000000 needs about 3.0 GiB of memory, this machine has 3.0 GiB "
                               "available: expected a smaller size")
    with pytest.raises(ValueError, match=r"needs about 10\.5 GiB"):
        cc.check_memory("--y 2", int(10.5 * 2**30))

