"""Decode attention and encode on a CUDA GPU: every backend against torch fp16 SDPA.

For B x S in {8x32768, 1x131072, 64x2048, 1x32768}, Hq=32, Hkv=8, D=128, block size 16:
  - our paged decode attention at 4, 3 and 2 bits (k_bits = v_bits): the Triton kernel and,
    where libtq_deploy_cuda.so is built and takes the bits (2, 4), the tensor-core CUDA kernel
    (each checked against the reference on a small case first),
  - torch fp16 F.scaled_dot_product_attention(q, k, v, enable_gqa=True) on the same logical
    KV, dense and contiguous,
  - speedup, achieved bandwidth (bytes the kernel must read / time) against a measured
    device-to-device copy bandwidth (bytes read + written / time).
Encode throughput for 1M x 128 fp16 vectors (bits 4, 3, 2), bytes read + written / time.

Times are medians of CUDA-event timings (triton.testing.do_bench, return_mode="median");
inputs smaller than 3x the L2 cache are rotated among copies so repeats don't hit L2.
Also reports CUDA-graph replay medians (no launch gaps) for attention and SDPA.
Writes JSON (--json, default $OUT/bench_gpu.json when $OUT is set) and prints a table last.

    tq-deploy bench gpu [--quick] [--sweep 8x32768] [--json PATH]
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F


def _median_ms(fn, warmup=25, rep=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _graph_ms(fn, rep=200):
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as exc:  # graph capture can fail for ops that sync
        print(f"  (cuda graph timing failed: {exc})", file=sys.stderr)
        return float("nan")


def copy_bandwidth(nbytes=4 << 30):
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = _median_ms(lambda: b.copy_(a), rep=300)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


class Rotator:
    """Cycle through copies of the inputs so that repeated timings don't hit the L2 cache."""

    def __init__(self, make, nbytes, l2_bytes):
        self.copies = max(1, math.ceil(3 * l2_bytes / max(nbytes, 1)))
        self.items = [make(i) for i in range(self.copies)]
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % self.copies
        return item


def make_tq_inputs(batch, seq, hq, hkv, dim, page, bits, seed):
    """Random packed cache (codes uniform, norms positive) with shuffled block tables."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = math.ceil(seq / page)
    n = batch * blocks_per_seq
    p = (dim * bits + 7) // 8
    k_codes = torch.randint(0, 256, (n, page, hkv, p), dtype=torch.uint8, device="cuda", generator=g)
    v_codes = torch.randint(0, 256, (n, page, hkv, p), dtype=torch.uint8, device="cuda", generator=g)
    k_norms = torch.rand((n, page, hkv), device="cuda", generator=g) * 10 + 1
    v_norms = torch.rand((n, page, hkv), device="cuda", generator=g) * 10 + 1
    tables = torch.randperm(n, device="cuda", generator=g).reshape(batch, blocks_per_seq).int()
    ctx = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, dim, device="cuda", generator=g, dtype=torch.float16)
    return query, k_codes, k_norms, v_codes, v_norms, tables, ctx


def tq_bytes(batch, seq, hkv, dim, bits):
    per_token_head = 2 * ((dim * bits + 7) // 8) + 8  # K codes + V codes + two fp32 norms
    return batch * seq * hkv * per_token_head


def check_small(impl, bits, hq, hkv, dim, page, rot, cb):
    """Relative error of impl against the reference on 2 sequences (3000 and 1777 tokens)."""
    from tq_deploy.reference.paged import paged_attention_reference

    check = make_tq_inputs(2, 3000, hq, hkv, dim, page, bits, seed=99)
    check[-1][1] = 1777  # context_lens: a partial last block in the second sequence
    want = paged_attention_reference(*check, rot, cb, cb, bits, bits).float()
    got = impl(*check, rot, cb, cb, bits, bits).float()
    return ((got - want).norm() / want.norm()).item()


def backend_call(run, **knobs):
    """A paged attention callable with the reference's signature that runs backend function ``run``."""
    from tq_deploy.reference.checks import check_paged_attention

    return lambda *a: run(check_paged_attention(*a, check_data=False), **knobs)


def implementations(bits, knobs, query, k_codes):
    """name -> paged attention callable, for the kernels that take this case."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference.checks import check_paged_attention
    from tq_deploy.triton import paged_attention as tq_triton

    impls = {"tq": backend_call(tq_triton.paged_attention, **(knobs or {}))}
    dim = query.shape[-1]
    probe = (query, k_codes, k_codes.new_zeros(k_codes.shape[:3], dtype=torch.float32), k_codes,
             k_codes.new_zeros(k_codes.shape[:3], dtype=torch.float32),
             torch.zeros(query.shape[0], 1, dtype=torch.int32, device=query.device),
             torch.zeros(query.shape[0], dtype=torch.int32, device=query.device),
             torch.eye(dim, device=query.device), torch.zeros(2**bits, device=query.device),
             torch.zeros(2**bits, device=query.device), bits, bits)
    if tq_cuda.supports_paged_attention(check_paged_attention(*probe, check_data=False)):
        impls["cu"] = backend_call(tq_cuda.paged_attention)
    return impls


def bench_attention(shapes, bits_list, hq, hkv, dim, page, l2, quick, knobs=None):
    from tq_deploy.reference import lloyd_max_codebook, make_rotation
    from tq_deploy.triton.paged_attention import choose_splits

    rot = make_rotation(dim, "haar", seed=0).cuda()
    rows = []
    for batch, seq in shapes:
        row = {"B": batch, "S": seq}
        # --- torch fp16 SDPA on the dense KV -------------------------------------------------
        kv_bytes = 2 * batch * hkv * seq * dim * 2

        def make_dense(i):
            gen = torch.Generator(device="cuda").manual_seed(100 + i)
            q = torch.randn(batch, hq, 1, dim, device="cuda", dtype=torch.float16, generator=gen)
            k = torch.randn(batch, hkv, seq, dim, device="cuda", dtype=torch.float16, generator=gen)
            v = torch.randn(batch, hkv, seq, dim, device="cuda", dtype=torch.float16, generator=gen)
            return q, k, v

        dense = Rotator(make_dense, kv_bytes, l2)

        def sdpa():
            q, k, v = dense.next()
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        row["sdpa_ms"] = _median_ms(sdpa)
        row["sdpa_graph_ms"] = float("nan") if quick else _graph_ms(sdpa)
        row["sdpa_TBps"] = kv_bytes / (row["sdpa_ms"] * 1e-3) / 1e12
        del dense
        torch.cuda.empty_cache()
        # --- ours -------------------------------------------------------------------------
        for bits in bits_list:
            cb = lloyd_max_codebook(dim, bits).cuda()
            nbytes = tq_bytes(batch, seq, hkv, dim, bits)
            sets = Rotator(lambda i: make_tq_inputs(batch, seq, hq, hkv, dim, page, bits, seed=i), nbytes, l2)
            first = sets.items[0]
            for name, impl in implementations(bits, knobs, first[0], first[1]).items():
                err = check_small(impl, bits, hq, hkv, dim, page, rot, cb)
                row[f"{name}{bits}_check_err"] = err
                if not err < 5e-3:
                    print(f"  {name} {bits}-bit: WRONG (relative error {err:.2e} on the check case): not timed")
                    continue

                def ours(impl=impl):
                    q, kc, kn, vc, vn, bt, ctx = sets.next()
                    return impl(q, kc, kn, vc, vn, bt, ctx, rot, cb, cb, bits, bits)

                ours()
                ms = _median_ms(ours)
                row[f"{name}{bits}_ms"] = ms
                row[f"{name}{bits}_graph_ms"] = float("nan") if quick else _graph_ms(ours)
                row[f"{name}{bits}_TBps"] = nbytes / (ms * 1e-3) / 1e12
                row[f"{name}{bits}_speedup"] = row["sdpa_ms"] / ms
            row[f"tq{bits}_splits"] = choose_splits(batch * hkv, seq, (knobs or {}).get("block_n", 64),
                                                    torch.cuda.get_device_properties(0).multi_processor_count)[0]
            del sets
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sweep_attention(batch, seq, bits, hq, hkv, dim, page, l2, variants):
    """Time paged attention under explicit knobs: Triton's (layout, lookup, block_n, num_warps,
    num_stages) or, with impl="cu", the CUDA kernel's tokens_per_split."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference import lloyd_max_codebook, make_rotation
    from tq_deploy.triton import paged_attention as tq_triton

    def paged_attention(*args, impl="tq", **knobs):
        return backend_call(tq_cuda.paged_attention if impl == "cu" else tq_triton.paged_attention, **knobs)(*args)

    rot = make_rotation(dim, "haar", seed=0).cuda()
    cb = lloyd_max_codebook(dim, bits).cuda()
    nbytes = tq_bytes(batch, seq, hkv, dim, bits)
    sets = Rotator(lambda i: make_tq_inputs(batch, seq, hq, hkv, dim, page, bits, seed=i), nbytes, l2)
    out = []
    for knobs in variants:
        try:
            err = check_small(lambda *a: paged_attention(*a, **knobs), bits, hq, hkv, dim, page, rot, cb)
        except Exception as exc:
            print(f"  sweep {knobs}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        if not err < 5e-3:
            print(f"  sweep {knobs}: WRONG, relative error {err:.2e}", flush=True)
            continue

        def ours():
            q, kc, kn, vc, vn, bt, ctx = sets.next()
            return paged_attention(q, kc, kn, vc, vn, bt, ctx, rot, cb, cb, bits, bits, **knobs)

        try:
            ours()
            ms = _median_ms(ours, warmup=10, rep=60)
        except Exception as exc:
            print(f"  sweep {knobs}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        out.append({"B": batch, "S": seq, "bits": bits, **knobs, "ms": ms, "TBps": nbytes / (ms * 1e-3) / 1e12,
                    "check_err": err})
        print(json.dumps(out[-1]), flush=True)
    return out


def bench_encode(n, dim, bits_list, dtype=torch.float16):
    from tq_deploy.dispatch import encode
    from tq_deploy.reference import lloyd_max_codebook, make_rotation

    rot = make_rotation(dim, "haar", seed=0).cuda()
    x = torch.randn(n, dim, device="cuda", dtype=dtype)
    out = []
    for bits in bits_list:
        cb = lloyd_max_codebook(dim, bits).cuda()
        encode(x, rot, cb, bits)
        ms = _median_ms(lambda: encode(x, rot, cb, bits))
        nbytes = x.numel() * x.element_size() + n * ((dim * bits + 7) // 8) + n * 4
        out.append({"bits": bits, "N": n, "D": dim, "ms": ms, "TBps": nbytes / (ms * 1e-3) / 1e12})
        print(json.dumps(out[-1]), flush=True)
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="skip CUDA-graph timings")
    ap.add_argument("--json", default=None, help="where to write the results (default $OUT/bench_gpu.json)")
    ap.add_argument("--shapes", default="8x32768,1x131072,64x2048,1x32768")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--sweep", default="", help="B x S to sweep kernel knobs on (4-bit), e.g. 8x32768")


def run(args) -> int:
    if not torch.cuda.is_available():
        raise ValueError("tq-deploy bench gpu needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    copy_bw = copy_bandwidth()
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write)", flush=True)
    sweep = []
    for spec in filter(None, args.sweep.split(",")):
        batch, seq = (int(v) for v in spec.split("x"))
        variants = [dict(impl="cu", tokens_per_split=t) for t in (0, 64, 128, 256, 512, 1024, 2048, 4096)]
        sweep += sweep_attention(batch, seq, 4, 32, 8, 128, 16, l2, variants)
    knobs = {}  # the Triton kernel's defaults (its knob sweeps: docs/performance.md)
    if sweep:
        best = sorted(sweep, key=lambda r: r["ms"])[:5]
        print("sweep best:", *[json.dumps(b) for b in best], sep="\n  ")
    att = bench_attention(shapes, bits_list, hq=32, hkv=8, dim=128, page=16, l2=l2, quick=args.quick, knobs=knobs)
    enc = bench_encode(1 << 20, 128, bits_list)
    result = {"knobs": knobs, "device": props.name, "copy_TBps": copy_bw / 1e12, "attention": att, "encode": enc, "sweep": sweep,
              "config": {"Hq": 32, "Hkv": 8, "D": 128, "block_size": 16, "timing": "do_bench median"}}
    path = args.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    # table last
    cb = copy_bw / 1e12
    print()
    print(f"paged decode attention, Hq=32 Hkv=8 D=128 block 16, median us (copy BW {cb:.2f} TB/s)")
    print("(tq = Triton kernel, cu = tensor-core CUDA kernel; x = SDPA time / ours; TB/s = packed bytes / time)")
    cols = [(name, b) for b in bits_list for name in ("tq", "cu")]
    print(f"{'B x S':>10} {'SDPA fp16':>10} " + " ".join(f"{n + str(b) + 'b':>8} {'x':>5} {'TB/s':>5}" for n, b in cols))

    def cell(r, n, b):
        if f"{n}{b}_ms" not in r:
            return f"{'-':>8} {'-':>5} {'-':>5}"
        return f"{r[f'{n}{b}_ms'] * 1e3:8.1f} {r[f'{n}{b}_speedup']:5.2f} {r[f'{n}{b}_TBps']:5.2f}"

    for r in att:
        print(f"{str(r['B']) + 'x' + str(r['S']):>10} {r['sdpa_ms'] * 1e3:10.1f} " + " ".join(cell(r, n, b) for n, b in cols))
    if not args.quick:
        print("cuda-graph replay medians, us: " + "; ".join(
            f"{r['B']}x{r['S']}: sdpa {r['sdpa_graph_ms'] * 1e3:.1f} "
            + " ".join(f"{n}{b} {r[f'{n}{b}_graph_ms'] * 1e3:.1f}" for b in bits_list for n in ("tq", "cu")
                       if f"{n}{b}_graph_ms" in r) for r in att))
    print("encode 1M x 128 fp16: " + "; ".join(
        f"{e['bits']}b {e['ms'] * 1e3:.1f} us {e['TBps']:.2f} TB/s ({100 * e['TBps'] / cb:.0f}% of copy)" for e in enc))
    return 0

