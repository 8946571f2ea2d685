"""TQPagedAttention in ONNX Runtime (CPU EP) beside the PyTorch reference.

    tq-deploy bench ort                         # S=8, context 4096, Hq=32, Hkv=8, D=128, 4 bits
    tq-deploy bench ort --context 1024 --runs 20 --threads 2

Both run on the same inputs (a random paged cache with shuffled block tables); the
table shows the median and min over --runs timed runs after --warmup untimed ones,
the KV-cache bytes each call reads and the resulting throughput, and the max abs
difference between the two outputs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

from tq_deploy.cli import count
from tq_deploy.ops import packed_size


def add_arguments(p) -> None:
    p.add_argument("--batch", type=count(1), default=8, help="sequences S (default 8)")
    p.add_argument("--context", type=count(1), default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--q-heads", type=count(1), default=32)
    p.add_argument("--kv-heads", type=count(1), default=8)
    p.add_argument("--head-dim", type=count(2), default=128)
    p.add_argument("--k-bits", type=int, default=None, help="key width (default 4)")
    p.add_argument("--v-bits", type=int, default=None, help="value width (default 4)")
    p.add_argument("--kv-preset", metavar="NAME", help="key/value widths of a preset (tq_deploy/presets.py), "
                                                         "instead of --k-bits/--v-bits")
    p.add_argument("--block-size", type=count(1), default=16)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--runs", type=count(1), default=10, help="timed runs per backend (median reported)")
    p.add_argument("--warmup", type=count(0), default=2)
    p.add_argument("--threads", type=count(0), default=0, help="ORT intra-op threads and torch threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true", help="time only ORT")


def make_inputs(a, gen) -> dict:
    import torch

    blocks_per_seq = -(-a.context // a.block_size)
    n = a.batch * blocks_per_seq
    shape = (n, a.block_size, a.kv_heads)
    return {
        "query": torch.randn(a.batch, a.q_heads, a.head_dim, generator=gen).to(getattr(torch, a.dtype)),
        "k_codes": torch.randint(0, 256, (*shape, packed_size(a.head_dim, a.k_bits)), dtype=torch.uint8, generator=gen),
        "k_norms": torch.rand(shape, generator=gen) * 4 + 0.5,
        "v_codes": torch.randint(0, 256, (*shape, packed_size(a.head_dim, a.v_bits)), dtype=torch.uint8, generator=gen),
        "v_norms": torch.rand(shape, generator=gen) * 4 + 0.5,
        "block_tables": torch.randperm(n, generator=gen).reshape(a.batch, blocks_per_seq).int(),
        "context_lens": torch.full((a.batch,), a.context, dtype=torch.int32),
    }


def time_it(fn, runs: int, warmup: int) -> tuple[list[float], object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def run(a) -> int:
    import numpy as np
    import onnxruntime as ort
    import torch

    from tq_deploy.export.single_op import initializer_arrays, make_op_model
    from tq_deploy.reference.paged import paged_attention_reference
    from tq_deploy.runtime.library import register_library

    if a.kv_preset is not None:
        from tq_deploy.presets import get_preset

        if a.k_bits is not None or a.v_bits is not None:
            raise ValueError(f"--kv-preset={a.kv_preset!r} with --k-bits/--v-bits, expected one or the other "
                             "(a preset fixes both widths)")
        preset = get_preset(a.kv_preset)
        a.k_bits, a.v_bits = preset.k_bits, preset.v_bits
    a.k_bits = 4 if a.k_bits is None else a.k_bits
    a.v_bits = 4 if a.v_bits is None else a.v_bits
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    model = make_op_model("TQPagedAttention", head_dim=a.head_dim, k_bits=a.k_bits, v_bits=a.v_bits,
                          num_q_heads=a.q_heads, num_kv_heads=a.kv_heads, block_size=a.block_size, dtype=a.dtype)
    init = {k: torch.from_numpy(v.copy()) for k, v in initializer_arrays(model).items()}
    inputs = make_inputs(a, gen)
    feeds = {k: v.numpy() for k, v in inputs.items()}

    options = ort.SessionOptions()
    if a.threads > 0:
        options.intra_op_num_threads = a.threads
    library = register_library(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ort_times, ort_out = time_it(lambda: session.run(None, feeds)[0], a.runs, a.warmup)

    rows = [("ORT CPU (libtq_deploy_ort)", ort_times)]
    max_diff = None
    if not a.skip_reference:
        def reference():
            with torch.inference_mode():
                return paged_attention_reference(
                    inputs["query"], inputs["k_codes"], inputs["k_norms"], inputs["v_codes"], inputs["v_norms"],
                    inputs["block_tables"], inputs["context_lens"], init["rotation"], init["k_codebook"],
                    init["v_codebook"], a.k_bits, a.v_bits)

        ref_times, ref_out = time_it(reference, max(1, min(a.runs, 5)), 1)
        rows.append(("PyTorch paged_attention_reference", ref_times))
        max_diff = float(np.abs(ort_out.astype(np.float32) - ref_out.float().numpy()).max())

    kv_bytes = a.batch * a.context * a.kv_heads * (packed_size(a.head_dim, a.k_bits)
                                                  + packed_size(a.head_dim, a.v_bits) + 8)
    print(f"TQPagedAttention  S={a.batch} context={a.context} Hq={a.q_heads} Hkv={a.kv_heads} D={a.head_dim} "
          f"k_bits={a.k_bits} v_bits={a.v_bits} B={a.block_size} {a.dtype}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; onnxruntime "
          f"{ort.__version__}, torch {torch.__version__}; threads={a.threads or 'default'}")
    print(f"library: {library}")
    print(f"KV cache read per call: {kv_bytes / 2**20:.1f} MiB")
    print()
    header = f"{'backend':36s} {'runs':>4s} {'median ms':>10s} {'min ms':>9s} {'GB/s':>7s} {'vs ref':>7s}"
    print(header)
    print("-" * len(header))
    ref_median = statistics.median(rows[-1][1]) if len(rows) > 1 else None
    for name, times in rows:
        med = statistics.median(times)
        speed = f"{ref_median / med:6.1f}x" if ref_median else "   n/a"
        print(f"{name:36s} {len(times):4d} {med * 1e3:10.2f} {min(times) * 1e3:9.2f} "
              f"{kv_bytes / med / 1e9:7.2f} {speed:>7s}")
    if max_diff is not None:
        print(f"\nmax |ORT - reference| = {max_diff:.3e}")
    return 0

