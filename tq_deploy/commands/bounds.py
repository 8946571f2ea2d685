"""tq-deploy bounds: the quantizer's measured MSE on random unit vectors against theory and the paper's bounds."""

from __future__ import annotations

import json

from tq_deploy.cli import count
from tq_deploy.ops import SUPPORTED_BITS


def add_arguments(parser) -> None:
    parser.add_argument("--head-dim", type=int, default=128, help="vector dimension D (default 128)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(SUPPORTED_BITS), help="bit widths (default 1 2 3 4)")
    parser.add_argument("--num-vectors", type=count(1), default=20000, help="random unit vectors per bit width")
    parser.add_argument("--rotation", choices=("haar", "hadamard"), default="haar")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def validation_rows(head_dim: int, bits_list, num_vectors: int, rotation: str, seed: int) -> list[dict]:
    from tq_deploy.reference.quantizer import TurboQuantMSE

    return [TurboQuantMSE(head_dim, bits, seed, rotation).validate(num_vectors) for bits in bits_list]


def run(args) -> int:
    rows = validation_rows(args.head_dim, args.bits, args.num_vectors, args.rotation, args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'bits':>4} {'D':>5} {'measured MSE':>13} {'theory':>10} {'lower 4^-b':>11} {'upper':>10}  ok")
        for r in rows:
            print(f"{r['bits']:>4} {r['head_dim']:>5} {r['mse']:>13.6f} {r['theory']:>10.6f} "
                  f"{r['lower_bound']:>11.6f} {r['upper_bound']:>10.6f}  {'yes' if r['within_bounds'] else 'NO'}")
    return 0 if all(r["within_bounds"] for r in rows) else 1
