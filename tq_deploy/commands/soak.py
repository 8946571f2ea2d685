"""tq-deploy soak: a long decode loop in ONNX Runtime with IO binding; memory flat, outputs right.

    tq-deploy soak --steps 100000                   # CPU EP, about a minute
    tq-deploy soak --steps 100000 --provider cuda   # CUDA EP (GPU memory checked too)

See tq_deploy/validate/long_run.py. Exit status: 0 memory flat and the end state equal to the
reference, 1 otherwise (the problems are listed), 2 bad options.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    from tq_deploy.validate.long_run import add_arguments as soak_arguments

    soak_arguments(parser)


def run(args) -> int:
    from tq_deploy.validate.long_run import run as soak_run

    return soak_run(args)
