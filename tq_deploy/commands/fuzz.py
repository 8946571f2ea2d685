"""tq-deploy fuzz: seeded fuzzing of the ONNX Runtime ops and the PyTorch API against the reference.

    tq-deploy fuzz --seed 0 --cases 300                  # seconds; what CI runs
    tq-deploy fuzz --seed 7 --cases 100000 --json f.json # the long run
    tq-deploy fuzz --first 1234 --cases 1 --seed 7       # replay one case

See tq_deploy/validate/fuzz.py for what a case is and what it must do. Exit status: 0 no
findings, 1 findings (listed), 2 bad options.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    from tq_deploy.validate.fuzz import add_arguments as fuzz_arguments

    fuzz_arguments(parser)


def run(args) -> int:
    from tq_deploy.validate.fuzz import run as fuzz_run

    return fuzz_run(args)
