"""The child process's entry (``python -m tq_deploy.validate.fuzz``): one batch of cases, a JSON line each.

The driver (:mod:`.driver`) starts it; ``tq-deploy fuzz`` (tq_deploy/commands/fuzz.py) is the
command line for people.
"""

from __future__ import annotations

import argparse

from tq_deploy.validate.fuzz.case import all_ops
from tq_deploy.validate.fuzz.driver import worker


def op_names(value: str | None, what: str = "op_names") -> tuple[str, ...] | None:
    """A comma-separated op list checked against the contract; None stays None (every op)."""
    if value is None:
        return None
    names = tuple(value.split(","))
    unknown = [o for o in names if o not in all_ops()]
    if unknown:
        raise ValueError(f"{what} has {unknown}, expected a subset of {list(all_ops())}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_deploy.validate.fuzz",
                                     description="one batch of fuzz cases (started by tq-deploy fuzz)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--cases", type=int, required=True)
    parser.add_argument("--ops", required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--library", default=None)
    parser.add_argument("--no-ort-for", default="")
    args = parser.parse_args(argv)
    worker(args.seed, args.first, args.cases, args.library, args.device, op_names(args.ops, "--ops"),
           tuple(o for o in args.no_ort_for.split(",") if o))
    return 0
