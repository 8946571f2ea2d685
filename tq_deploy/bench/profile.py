"""Repeated calls of the decode attention on one benchmark shape, for a profiler (ncu).

Hq=32, Hkv=8, D=128, block 16, random packed cache (as ``tq-deploy bench gpu``), through the
public dispatcher. Prints the host time per call (checks, dispatch, launches; no
synchronization). Per-kernel times:

    ncu --clock-control none --metrics gpu__time_duration.sum tq-deploy bench profile 8x32768 --calls 1
"""

from __future__ import annotations

import time

from tq_deploy.cli import count


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape={text!r}, expected BxS such as 8x32768") from None
    if batch < 1 or seq < 1:
        raise ValueError(f"shape={text!r}, expected B >= 1 and S >= 1")
    return batch, seq


def add_arguments(parser) -> None:
    parser.add_argument("shape", help="B x S, e.g. 8x32768")
    parser.add_argument("--calls", type=count(1), default=3, help="timed calls after 3 warm-up calls (default 3)")
    parser.add_argument("--bits", type=int, default=4, help="k_bits = v_bits (default 4)")


def run(args) -> int:
    import torch

    from tq_deploy import dispatch
    from tq_deploy.bench.gpu import make_tq_inputs
    from tq_deploy.reference import lloyd_max_codebook, make_rotation

    batch, seq = _shape(args.shape)
    if args.calls < 1:
        raise ValueError(f"--calls={args.calls}, expected >= 1")
    if not torch.cuda.is_available():
        raise ValueError("tq-deploy bench profile needs a CUDA device")
    rot = make_rotation(128, "haar", seed=0).cuda()
    cb = lloyd_max_codebook(128, args.bits).cuda()
    inputs = make_tq_inputs(batch, seq, 32, 8, 128, 16, args.bits, args.bits, seed=1)
    for _ in range(3):
        dispatch.paged_attention(*inputs, rot, cb, cb, args.bits, args.bits)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.calls):
        dispatch.paged_attention(*inputs, rot, cb, cb, args.bits, args.bits)
    host = (time.perf_counter() - start) / args.calls
    torch.cuda.synchronize()
    print(f"{args.shape}: host time per call {host * 1e6:.1f} us ({args.calls} calls)")
    return 0
