"""tq-deploy fuzz: seeded fuzzing of the ONNX Runtime ops and the PyTorch API against the reference.

    tq-deploy fuzz --seed 0 --cases 300                  # seconds; what CI runs
    tq-deploy fuzz --seed 7 --cases 100000 --json f.json # the long run
    tq-deploy fuzz --first 1234 --cases 1 --seed 7       # replay one case

See tq_deploy/validate/fuzz/ for what a case is and what it must do. Exit status: 0 no
findings, 1 findings (listed), 2 bad options.
"""

from __future__ import annotations

import json

from tq_deploy.cli import count


def add_arguments(parser) -> None:
    from tq_deploy.validate.fuzz import all_ops

    parser.add_argument("--seed", type=int, default=0, help="seed of the run (case i draws from (seed, i))")
    parser.add_argument("--cases", type=count(1), default=200, help="number of cases (default 200)")
    parser.add_argument("--first", type=count(0), default=0, help="index of the first case (replay: --first I "
                                                                  "--cases 1)")
    parser.add_argument("--batch", type=count(1), default=100, help="cases per child process (default 100)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a case may take before it counts as a hang (default 120)")
    parser.add_argument("--ops", default=None, help=f"comma-separated ops (default all: {','.join(all_ops())})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="also run the PyTorch API on this device's tensors (cuda: the GPU kernels)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.validate.fuzz import fuzz, op_names

    ops = op_names(args.ops, "--ops")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda, but this machine has no CUDA device (torch {torch.__version__}): "
                             "expected cpu")
    from tq_deploy.runtime.session import check_library

    check_library(args.library)
    if args.json:
        files.check_writable(args.json, "--json", inputs=[("--library", args.library)])
    report = fuzz(args.seed, args.cases, first=args.first, batch=args.batch, timeout=args.timeout,
                  library=args.library, device=args.device, op_names=ops)
    print(report.to_text())
    if args.json:
        files.write_text(args.json, json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1
