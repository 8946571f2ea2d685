#!/usr/bin/env python3
"""Run the tensor-core CUDA paged attention a few times on one benchmark shape, for a profiler.

Hq=32, Hkv=8, D=128, block 16, 4 bits, random packed cache (as scripts/bench_gpu.py). Prints
the host time per call (the Python wrapper + launches, no synchronization). Per-kernel times:

    PYTHONPATH=. ncu --clock-control none --metrics gpu__time_duration.sum python3 scripts/profile_attention.py 8x32768 1
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from tq_deploy import cuda as tq_cuda  # noqa: E402
from tq_deploy.reference import lloyd_max_codebook, make_rotation  # noqa: E402
from tq_deploy.triton.bench import make_tq_inputs  # noqa: E402


def main(argv) -> int:
    if len(argv) < 1 or "x" not in argv[0]:
        print("usage: profile_attention.py BxS [calls]", file=sys.stderr)
        return 2
    batch, seq = (int(v) for v in argv[0].split("x"))
    calls = int(argv[1]) if len(argv) > 1 else 3
    if not tq_cuda.available():
        print("profile_attention: libtq_deploy_cuda.so or a CUDA device is missing", file=sys.stderr)
        return 2
    rot = make_rotation(128, "haar", seed=0).cuda()
    cb = lloyd_max_codebook(128, 4).cuda()
    inputs = make_tq_inputs(batch, seq, 32, 8, 128, 16, 4, seed=1)
    for _ in range(3):
        tq_cuda.paged_attention(*inputs, rot, cb, cb, 4, 4)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        tq_cuda.paged_attention(*inputs, rot, cb, cb, 4, 4)
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    print(f"{argv[0]}: host time per call {host * 1e6:.1f} us ({calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
