"""Encode/decode throughput of the reference quantizer and the MSE table, on any torch device."""

from __future__ import annotations

import statistics
import time

from tq_deploy.cli import count, torch_device
from tq_deploy.ops import SUPPORTED_BITS


def add_arguments(parser) -> None:
    parser.add_argument("--head-dim", type=count(2), default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=list(SUPPORTED_BITS))
    parser.add_argument("--num-vectors", type=count(1), default=65536, help="vectors per encode/decode call")
    parser.add_argument("--repeat", type=count(1), default=5, help="timed repetitions (median reported)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="torch device for the throughput runs "
                        "(cpu, cuda, cuda:N)")


def _median_seconds(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> int:
    import torch

    from tq_deploy.reference.quantizer import TurboQuantMSE

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(args.num_vectors, args.head_dim, device=device, dtype=torch.float16)
    print(f"device={device} vectors={args.num_vectors} D={args.head_dim} input fp16, median of {args.repeat}")
    print(f"{'bits':>4} {'encode Mvec/s':>14} {'decode Mvec/s':>14} {'MSE(unit)':>10} {'theory':>9} {'ratio vs fp16':>14}")
    for bits in args.bits:
        q = TurboQuantMSE(args.head_dim, bits, device=device)
        codes, norms = q.encode(x)
        t_enc = _median_seconds(lambda: q.encode(x), args.repeat, sync)
        t_dec = _median_seconds(lambda: q.decode(codes, norms), args.repeat, sync)
        v = q.validate(num_vectors=8192)
        print(f"{bits:>4} {args.num_vectors / t_enc / 1e6:>14.3g} {args.num_vectors / t_dec / 1e6:>14.3g} "
              f"{v['mse']:>10.5f} {v['theory']:>9.5f} {q.compression_ratio():>14.2f}")
    return 0
