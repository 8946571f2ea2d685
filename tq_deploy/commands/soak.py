"""tq-deploy soak: a long decode loop in ONNX Runtime with IO binding; memory flat, outputs right.

    tq-deploy soak --steps 100000                   # CPU EP, about a minute
    tq-deploy soak --steps 100000 --provider cuda   # CUDA EP (GPU memory checked too)

See tq_deploy/validate/long_run.py. Exit status: 0 memory flat and the end state equal to the
reference, 1 otherwise (the problems are listed), 2 bad options.
"""

from __future__ import annotations

from tq_deploy import ops


def add_arguments(parser) -> None:
    from tq_deploy.cli import count

    parser.add_argument("--steps", type=count(1), default=100_000, help="decode steps (default 100000)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime EP (default cpu)")
    parser.add_argument("--num-seqs", type=count(1), default=2, help="sequences S (default 2)")
    parser.add_argument("--head-dim", type=count(2), default=72, help="D (default 72: not a multiple of 8)")
    parser.add_argument("--bits", type=int, choices=ops.SUPPORTED_BITS, default=3, help="k and v bits (default 3)")
    parser.add_argument("--block-size", type=count(1), default=4, help="B (default 4)")
    parser.add_argument("--blocks-per-seq", type=count(1), default=3, help="ring of M blocks per sequence (default 3)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--threads", type=count(1), default=1, help="ORT intra-op threads (default 1)")
    parser.add_argument("--max-growth", type=float, default=0.01, help="allowed memory growth (default 0.01 = 1%%)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")


def run(args) -> int:
    import json

    from tq_deploy import files
    from tq_deploy.validate.long_run import soak

    if args.json:
        files.check_writable(args.json, "--json", inputs=[("--library", args.library)])
    report = soak(args.steps, num_seqs=args.num_seqs, head_dim=args.head_dim, bits=args.bits,
                  block_size=args.block_size, blocks_per_seq=args.blocks_per_seq, provider=args.provider,
                  library=args.library, max_growth=args.max_growth, threads=args.threads, dtype=args.dtype)
    print(report.to_text())
    if args.json:
        files.write_text(args.json, json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1
