"""Decode attention, encode and cache update on a CUDA GPU against the best torch fp16 SDPA.

    tq-deploy bench gpu [--quick] [--shapes 8x32768,...] [--bits 4,3,2,k6v4,k8v4] [--json PATH]
    tq-deploy bench gpu --splits [--shapes ...] [--bits ...]     # split-size sweep only

Attention, Hq=32, Hkv=8, D=128, block 16, for B x S in 8x32768, 32x8192, 1x131072, 64x2048,
1x32768 and each bit configuration (k_bits = v_bits, or kXvY):
  SDPA      the fastest torch fp16 F.scaled_dot_product_attention variant on the same logical KV,
            dense and contiguous: GQA (enable_gqa=True) or the query heads folded per KV head
            (q [B, Hkv, G, D] against k [B, Hkv, S, D]), each under the flash, efficient and cuDNN
            backends torch offers here
  eager     tq_deploy.cuda through a plan (tq_deploy.dispatch.plan_paged_attention): the launch
            a decode loop makes, host time included
  graph     the same launch replayed from a CUDA graph (no launch gaps)
  TRT       the TensorRT plugin's enqueue (libtq_deploy_trt through the harness, the workspace
            TensorRT would give it), back to back
  x         SDPA time / ours;  TB/s: the bytes the kernel must read / time;  roof: the bytes
            roofline of the speedup (fp16 KV bytes / TurboQuant bytes)
Every kernel is checked against the reference on a small case first (relative error < 5e-3).
Then: other bit widths, query groups, block sizes and head dims at 8x32768 against SDPA on the
same shape (and the kernel each takes); encode and cache update throughput as a fraction of the device-to-device
copy bandwidth; host time per call of the public API, of the plan and of the raw backend call.

Times are medians of CUDA-event timings (triton.testing.do_bench, return_mode="median");
inputs smaller than 3x the L2 cache are rotated among copies so repeats do not hit L2.
Writes JSON (--json, default $OUT/bench_gpu.json when $OUT is set); prints the tables last.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

HQ, HKV, DIM, BLOCK = 32, 8, 128, 16
CHECK_TOL = 5e-3


def _median_ms(fn, warmup=25, rep=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _graph_ms(fn, rep=200):
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as exc:  # a variant that cannot be captured is reported, not fatal
        print(f"  (cuda graph timing failed: {type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return float("nan")


def copy_bandwidth(nbytes=4 << 30):
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = _median_ms(lambda: b.copy_(a), rep=300)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


class Rotator:
    """Cycle through copies of the inputs so that repeated timings do not hit the L2 cache."""

    def __init__(self, make, nbytes, l2_bytes):
        self.copies = max(1, math.ceil(3 * l2_bytes / max(nbytes, 1)))
        self.items = [make(i) for i in range(self.copies)]
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % self.copies
        return item


def parse_bits(spec: str) -> tuple[int, int]:
    spec = spec.strip().lower()
    if spec.startswith("k") and "v" in spec:
        k, v = spec[1:].split("v")
        return int(k), int(v)
    return int(spec), int(spec)


def bits_name(k: int, v: int) -> str:
    return f"{k}b" if k == v else f"k{k}v{v}"


def tq_bytes(batch, seq, hkv, dim, k_bits, v_bits, norm_bytes=4):
    """Bytes the attention must read: K and V codes plus one norm each (float32: 4 bytes, float16: 2),
    per token and KV head."""
    return batch * seq * hkv * ((dim * k_bits + 7) // 8 + (dim * v_bits + 7) // 8 + 2 * norm_bytes)


def fp16_bytes(batch, seq, hkv, dim):
    return 2 * batch * hkv * seq * dim * 2


def make_tq_inputs(batch, seq, hq, hkv, dim, page, k_bits, v_bits, seed, norm_dtype=torch.float32):
    """Random packed cache (codes uniform, norms positive, of ``norm_dtype``), shuffled block tables,
    fp16 queries."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = math.ceil(seq / page)
    n = batch * blocks_per_seq
    k_codes = torch.randint(0, 256, (n, page, hkv, (dim * k_bits + 7) // 8), dtype=torch.uint8, device="cuda",
                            generator=g)
    v_codes = torch.randint(0, 256, (n, page, hkv, (dim * v_bits + 7) // 8), dtype=torch.uint8, device="cuda",
                            generator=g)
    k_norms = (torch.rand((n, page, hkv), device="cuda", generator=g) * 10 + 1).to(norm_dtype)
    v_norms = (torch.rand((n, page, hkv), device="cuda", generator=g) * 10 + 1).to(norm_dtype)
    tables = torch.randperm(n, device="cuda", generator=g).reshape(batch, blocks_per_seq).int()
    ctx = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, dim, device="cuda", generator=g, dtype=torch.float16)
    return query, k_codes, k_norms, v_codes, v_norms, tables, ctx


def constants(dim, k_bits, v_bits):
    from tq_deploy.reference import lloyd_max_codebook, make_rotation

    return (make_rotation(dim, "haar", seed=0).cuda(), lloyd_max_codebook(dim, k_bits).cuda(),
            lloyd_max_codebook(dim, v_bits).cuda())


def key_mean_inputs(hkv, dim):
    """A key mean of Llama-like size (ops.py: key_mean) and Llama's RoPE rates, on the GPU."""
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(hkv, dim, generator=g) * 3
    rates = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return mean.cuda(), rates.cuda()


def check_error(run, hq, hkv, dim, page, k_bits, v_bits, mean=(), norm_dtype=torch.float32):
    """Relative error of run(*inputs, rot, kcb, vcb) against the reference on 2 sequences (``mean``:
    the key mean's two inputs, given to both)."""
    from tq_deploy.reference.paged import paged_attention_reference

    rot, kcb, vcb = constants(dim, k_bits, v_bits)
    case = list(make_tq_inputs(2, 3000, hq, hkv, dim, page, k_bits, v_bits, seed=99, norm_dtype=norm_dtype))
    case[-1][1] = 1777  # a partial last block
    want = paged_attention_reference(*case, rot, kcb, vcb, k_bits, v_bits, 0.0, *mean).float()
    got = run(*case, rot, kcb, vcb).float()
    return ((got - want).norm() / want.norm()).item()


# --- torch SDPA -------------------------------------------------------------------------------

def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def best_sdpa(batch, seq, hq, hkv, dim, l2, quick):
    """(best name, eager ms, graph ms, every variant's ms) of torch fp16 SDPA on this shape."""
    from torch.nn.attention import sdpa_kernel

    group = hq // hkv

    def make_dense(i):
        gen = torch.Generator(device="cuda").manual_seed(100 + i)
        q = torch.randn(batch, hq, 1, dim, device="cuda", dtype=torch.float16, generator=gen)
        k = torch.randn(batch, hkv, seq, dim, device="cuda", dtype=torch.float16, generator=gen)
        v = torch.randn(batch, hkv, seq, dim, device="cuda", dtype=torch.float16, generator=gen)
        return q, k, v

    dense = Rotator(make_dense, fp16_bytes(batch, seq, hkv, dim), l2)
    variants = {}
    for layout in ("gqa", "folded"):
        for name, backend in _sdpa_backends().items():
            def call(layout=layout, backend=backend):
                q, k, v = dense.next()
                with sdpa_kernel(backend):
                    if layout == "gqa":
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    return F.scaled_dot_product_attention(q.view(batch, hkv, group, dim), k, v)
            try:
                call()
                variants[f"{layout}/{name}"] = (_median_ms(call), call)
            except RuntimeError as exc:  # a backend that does not take this shape here
                variants[f"{layout}/{name}"] = (float("nan"), None)
                print(f"  sdpa {layout}/{name} {batch}x{seq}: not available ({str(exc).splitlines()[0][:120]})",
                      file=sys.stderr)
    timed = {k: v for k, v in variants.items() if v[1] is not None}
    best = min(timed, key=lambda k: timed[k][0])
    graph = float("nan") if quick else _graph_ms(timed[best][1])
    result = (best, timed[best][0], graph, {k: v[0] for k, v in variants.items()})
    del dense
    torch.cuda.empty_cache()
    return result


# --- ours -------------------------------------------------------------------------------------

def _trt_enqueue_ms(inputs, attrs, out, repeat=200):
    """Median per-enqueue time of the TensorRT attention plugin through the harness: the
    difference between repeat and 1 back-to-back enqueues (the harness's setup cancels out)."""
    from tq_deploy.runtime.trt_harness import harness_enqueue

    stream = torch.cuda.current_stream().cuda_stream

    def wall(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        harness_enqueue("TQPagedAttention", attrs, inputs, [out], stream=stream, repeat=n)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    wall(2)
    samples = sorted((wall(repeat) - wall(1)) / (repeat - 1) for _ in range(5))
    return samples[len(samples) // 2] * 1e3


def _trt_available() -> bool:
    from tq_deploy.runtime import library

    try:
        library.locate("trt")
        library.locate("trt_harness")
        return True
    except library.NativeLibraryNotFoundError:
        return False


def bench_tq(batch, seq, hq, hkv, dim, page, k_bits, v_bits, l2, quick, trt, key_mean=False,
             norm_dtype=torch.float32):
    """Our attention on one shape: eager (plan), graph and TRT-plugin medians, checked first;
    ``key_mean``: with the attention's optional key mean (no TRT column); ``norm_dtype``: the cache's
    norms."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.dispatch import plan_paged_attention

    rot, kcb, vcb = constants(dim, k_bits, v_bits)
    mean = key_mean_inputs(hkv, dim) if key_mean else ()

    def planned(*a):
        return plan_paged_attention(*a, k_bits, v_bits, 0.0, *mean).run(a[0], a[5], a[6])

    err = check_error(planned, hq, hkv, dim, page, k_bits, v_bits, mean, norm_dtype)
    cell = {"check_err": err}
    if not err < CHECK_TOL:
        print(f"  {bits_name(k_bits, v_bits)} {batch}x{seq}: WRONG (relative error {err:.2e}): not timed")
        return cell
    nbytes = tq_bytes(batch, seq, hkv, dim, k_bits, v_bits, torch.finfo(norm_dtype).bits // 8)
    sets = Rotator(lambda i: make_tq_inputs(batch, seq, hq, hkv, dim, page, k_bits, v_bits, seed=i,
                                            norm_dtype=norm_dtype), nbytes, l2)
    plans = [(plan_paged_attention(*s, rot, kcb, vcb, k_bits, v_bits, 0.0, *mean), s) for s in sets.items]
    outs = [torch.empty_like(s[0]) for s in sets.items]
    state = {"i": 0}

    def ours():
        i = state["i"] = (state["i"] + 1) % len(plans)
        plan, s = plans[i]
        return plan.run(s[0], s[5], s[6], outs[i])

    ours()
    cell["path"] = plans[0][0].path
    cell["ms"] = _median_ms(ours)
    cell["graph_ms"] = float("nan") if quick else _graph_ms(ours)
    cell["TBps"] = nbytes / (cell["ms"] * 1e-3) / 1e12
    if trt and not key_mean:
        s = sets.items[0]
        try:
            cell["trt_ms"] = _trt_enqueue_ms([t.contiguous() for t in (*s, rot, kcb, vcb)], {"k_bits": k_bits, "v_bits": v_bits, "scale": 0.0},
                                             torch.empty_like(s[0]))
        except (RuntimeError, ValueError) as exc:
            print(f"  TRT plugin {bits_name(k_bits, v_bits)} {batch}x{seq}: {exc}", file=sys.stderr)
    del sets, plans, outs
    torch.cuda.empty_cache()
    assert tq_cuda.available()
    return cell


def bench_attention(shapes, configs, l2, quick, trt):
    rows = []
    for batch, seq in shapes:
        name, ms, graph, variants = best_sdpa(batch, seq, HQ, HKV, DIM, l2, quick)
        row = {"B": batch, "S": seq, "sdpa": name, "sdpa_ms": ms, "sdpa_graph_ms": graph, "sdpa_variants": variants}
        for k_bits, v_bits in configs:
            row[bits_name(k_bits, v_bits)] = bench_tq(batch, seq, HQ, HKV, DIM, BLOCK, k_bits, v_bits, l2, quick, trt)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


class OtherShape(NamedTuple):
    label: str
    hq: int
    hkv: int
    dim: int
    block: int
    k_bits: int
    v_bits: int
    key_mean: bool = False
    norm_dtype: torch.dtype = torch.float32


# other bit widths, query groups, block sizes and head dims, at one long-context batch
OTHER_SHAPES = [
    OtherShape("k5v3", 32, 8, 128, 16, 5, 3),
    OtherShape("k4v4 + key mean", 32, 8, 128, 16, 4, 4, key_mean=True),
    OtherShape("k5v4 + key mean, float16 norms (compact)", 32, 8, 128, 16, 5, 4, key_mean=True,
               norm_dtype=torch.float16),
    OtherShape("k4v4, float16 norms", 32, 8, 128, 16, 4, 4, norm_dtype=torch.float16),
    OtherShape("k8v8", 32, 8, 128, 16, 8, 8),
    OtherShape("k1v1", 32, 8, 128, 16, 1, 1),
    OtherShape("group 16", 128, 8, 128, 16, 4, 4),
    OtherShape("group 12", 96, 8, 128, 16, 4, 4),
    OtherShape("block 8", 32, 8, 128, 8, 4, 4),
    OtherShape("block 24", 32, 8, 128, 24, 4, 4),
    OtherShape("block 1", 32, 8, 128, 1, 4, 4),
    OtherShape("D 64", 32, 8, 64, 16, 4, 4),
    OtherShape("D 64 k4v4 + key mean", 32, 8, 64, 16, 4, 4, key_mean=True),
    OtherShape("D 256", 32, 8, 256, 16, 4, 4),
    OtherShape("D 96", 32, 8, 96, 16, 4, 4),
    OtherShape("D 80 k3v3", 32, 8, 80, 16, 3, 3),
    OtherShape("D 320", 32, 8, 320, 16, 4, 4),
]


def bench_other_shapes(batch, seq, l2, quick):
    rows = []
    for o in OTHER_SHAPES:
        name, ms, _, _ = best_sdpa(batch, seq, o.hq, o.hkv, o.dim, l2, True)
        cell = bench_tq(batch, seq, o.hq, o.hkv, o.dim, o.block, o.k_bits, o.v_bits, l2, True, False,
                        key_mean=o.key_mean, norm_dtype=o.norm_dtype)
        rows.append({"label": o.label, "B": batch, "S": seq, "sdpa": name, "sdpa_ms": ms, **cell})
        print(json.dumps(rows[-1]), flush=True)
    return rows


SPLIT_CHOICES = (64, 128, 256, 512, 1024, 2048, 4096)


def bench_splits(shapes, configs, l2):
    """Eager medians (us) of the tensor-core attention at each tokens_per_split (0: the plan's own
    choice) per shape and bit configuration: how the split-K size was chosen."""
    from tq_deploy.dispatch import plan_paged_attention

    rows = []
    for k_bits, v_bits in configs:
        rot, kcb, vcb = constants(DIM, k_bits, v_bits)
        for batch, seq in shapes:
            nbytes = tq_bytes(batch, seq, HKV, DIM, k_bits, v_bits)
            sets = Rotator(lambda i: make_tq_inputs(batch, seq, HQ, HKV, DIM, BLOCK, k_bits, v_bits, seed=i), nbytes,
                           l2)
            row = {"bits": bits_name(k_bits, v_bits), "B": batch, "S": seq, "us": {}}
            for tps in (0, *SPLIT_CHOICES):
                if tps * 16 > 4 * seq:  # a CTA of 16 warps would be more than 3/4 idle
                    continue
                plans = [plan_paged_attention(*x, rot, kcb, vcb, k_bits, v_bits, tokens_per_split=tps)
                         for x in sets.items]
                outs = [torch.empty_like(x[0]) for x in sets.items]
                state = {"i": 0}

                def step():
                    i = state["i"] = (state["i"] + 1) % len(plans)
                    x = sets.items[i]
                    return plans[i].run(x[0], x[5], x[6], outs[i])

                step()
                row["us"][tps] = _median_ms(step, rep=100) * 1e3
            rows.append(row)
            print(json.dumps(row), flush=True)
            del sets
            torch.cuda.empty_cache()
    return rows


def print_splits(rows):
    print("\ntensor-core attention by tokens per split (per warp; 0 = the plan's choice), eager median us")
    print(f"{'bits':>5} {'B x S':>9} " + " ".join(f"{t:>7}" for t in (0, *SPLIT_CHOICES)))
    for r in rows:
        cells = " ".join(f"{r['us'][t]:7.1f}" if t in r["us"] else f"{'-':>7}" for t in (0, *SPLIT_CHOICES))
        print(f"{r['bits']:>5} {r['B']:>4}x{r['S']:<6} {cells}")


# --- encode, cache update, host cost ------------------------------------------------------------

def bench_encode(n, dim, configs, dtypes=(torch.float16, torch.bfloat16)):
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference.checks import check_encode

    rot = constants(dim, 4, 4)[0]
    out = []
    for dtype in dtypes:
        x = torch.randn(n, dim, device="cuda", dtype=dtype)
        for bits in sorted({b for kv in configs for b in kv}):
            cb = constants(dim, bits, bits)[1]
            a = check_encode(x, rot, cb, bits, check_data=False)
            tq_cuda.encode(a)
            ms = _median_ms(lambda: tq_cuda.encode(a))
            nbytes = x.numel() * x.element_size() + n * ((dim * bits + 7) // 8) + n * 4
            out.append({"what": "encode", "dtype": str(dtype).replace("torch.", ""), "bits": bits, "N": n, "D": dim,
                        "ms": ms, "TBps": nbytes / (ms * 1e-3) / 1e12})
            print(json.dumps(out[-1]), flush=True)
    return out


def bench_cache_update(tokens, hkv, dim, configs, dtypes=(torch.float16, torch.bfloat16)):
    """Prefill-sized cache update: ``tokens`` new tokens into a shuffled paged cache."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference.checks import check_cache_update

    out = []
    for dtype in dtypes:
        key = torch.randn(tokens, hkv, dim, device="cuda", dtype=dtype)
        value = torch.randn(tokens, hkv, dim, device="cuda", dtype=dtype)
        for k_bits, v_bits in configs:
            rot, kcb, vcb = constants(dim, k_bits, v_bits)
            n = tokens // BLOCK + 1
            caches = (torch.zeros(n, BLOCK, hkv, (dim * k_bits + 7) // 8, dtype=torch.uint8, device="cuda"),
                      torch.zeros(n, BLOCK, hkv, device="cuda"),
                      torch.zeros(n, BLOCK, hkv, (dim * v_bits + 7) // 8, dtype=torch.uint8, device="cuda"),
                      torch.zeros(n, BLOCK, hkv, device="cuda"))
            slots = torch.randperm(n * BLOCK, device="cuda")[:tokens]
            a = check_cache_update(key, value, slots, *caches, rot, kcb, vcb, k_bits, v_bits, check_data=False)
            tq_cuda.cache_update(a)
            ms = _median_ms(lambda: tq_cuda.cache_update(a))
            rows = tokens * hkv
            nbytes = (2 * rows * dim * key.element_size() + tokens * 8
                      + rows * ((dim * k_bits + 7) // 8 + (dim * v_bits + 7) // 8 + 8))
            out.append({"what": "cache_update", "dtype": str(dtype).replace("torch.", ""),
                        "bits": bits_name(k_bits, v_bits), "T": tokens, "ms": ms,
                        "TBps": nbytes / (ms * 1e-3) / 1e12})
            print(json.dumps(out[-1]), flush=True)
    return out


def host_cost_us(calls=300):
    """Host time per call (us) of the public API, the plan's run and the raw backend call, timed
    as the issue rate of ``calls`` launches (fewer than the launch queue holds) on a small shape."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.dispatch import paged_attention, plan_paged_attention
    from tq_deploy.reference.checks import check_paged_attention

    rot, kcb, vcb = constants(DIM, 4, 4)
    s = make_tq_inputs(1, 256, HQ, HKV, DIM, BLOCK, 4, 4, seed=5)
    args = (*s, rot, kcb, vcb, 4, 4)
    plan = plan_paged_attention(*args)
    out = torch.empty_like(s[0])
    checked = check_paged_attention(*args, check_data=False)
    ways = {"public paged_attention": lambda: paged_attention(*args),
            "plan.run": lambda: plan.run(s[0], s[5], s[6], out),
            "tq_deploy.cuda on checked args": lambda: tq_cuda.paged_attention(checked)}
    result = {}
    for name, fn in ways.items():
        fn()
        samples = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
        result[name] = sorted(samples)[2]
    return result


# --- report -----------------------------------------------------------------------------------

def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="skip CUDA-graph timings and the other-shapes table")
    ap.add_argument("--json", default=None, help="where to write the results (default $OUT/bench_gpu.json)")
    ap.add_argument("--shapes", default="8x32768,32x8192,1x131072,64x2048,1x32768")
    ap.add_argument("--bits", default="4,3,2,k6v4,k8v4", help="bit configurations: N (keys and values) or kXvY")
    ap.add_argument("--no-trt", action="store_true", help="skip the TensorRT-plugin column")
    ap.add_argument("--splits", action="store_true",
                    help="only the split-size sweep of the tensor-core attention (--shapes, --bits)")


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, float) and not math.isnan(v) else "-"


def print_tables(result, configs):
    cb = result["copy_TBps"]
    print()
    print(f"device {result['device']}; copy bandwidth {cb:.2f} TB/s (read + write); Hq={HQ} Hkv={HKV} D={DIM} "
          f"block {BLOCK}; median us")
    print("SDPA = best torch fp16 variant (layout/backend); x = SDPA time / ours; TB/s = bytes read / time; "
          "roof = fp16 bytes / our bytes")
    for k, v in configs:
        name = bits_name(k, v)
        roof = fp16_bytes(1, 1, 1, DIM) / tq_bytes(1, 1, 1, DIM, k, v)
        print(f"\n{name} (roof {roof:.2f}x)")
        print(f"{'B x S':>9} {'SDPA':>7} {'variant':>15} {'eager':>7} {'x':>5} {'graph':>7} {'x':>5} "
              f"{'TRT':>7} {'x':>5} {'TB/s':>5} {'%copy':>5} {'path':>11}")
        for r in result["attention"]:
            c = r.get(name, {})
            if "ms" not in c:
                print(f"{r['B']:>4}x{r['S']:<6} {r['sdpa_ms'] * 1e3:7.1f} {r['sdpa']:>15}   not timed "
                      f"(check error {c.get('check_err', float('nan')):.2e})")
                continue
            sdpa_graph = r["sdpa_graph_ms"] if not math.isnan(r["sdpa_graph_ms"]) else r["sdpa_ms"]
            trt = c.get("trt_ms", float("nan"))
            print(f"{r['B']:>4}x{r['S']:<6} {r['sdpa_ms'] * 1e3:7.1f} {r['sdpa']:>15} {c['ms'] * 1e3:7.1f} "
                  f"{r['sdpa_ms'] / c['ms']:5.2f} {_fmt(c['graph_ms'] * 1e3, '7.1f'):>7} "
                  f"{_fmt(sdpa_graph / c['graph_ms'], '5.2f'):>5} {_fmt(trt * 1e3, '7.1f'):>7} "
                  f"{_fmt(r['sdpa_ms'] / trt, '5.2f'):>5} {c['TBps']:5.2f} {100 * c['TBps'] / cb:5.0f} "
                  f"{c['path']:>11}")
    if result.get("other_shapes"):
        print("\nother shapes at " + f"{result['other_shapes'][0]['B']}x{result['other_shapes'][0]['S']}" +
              " (vs SDPA on the same shape)")
        for r in result["other_shapes"]:
            ms = r.get("ms", float("nan"))
            print(f"  {r['label']:>20}: ours {_fmt(ms * 1e3, '.1f')} us ({r.get('path', '?')}), SDPA "
                  f"{r['sdpa_ms'] * 1e3:.1f} us -> {_fmt(r['sdpa_ms'] / ms, '.2f')}x")
    for e in result["encode"] + result["cache_update"]:
        label = f"{e['what']} {e['dtype']} {e['bits']}"
        size = f"{e['N']} x {e['D']}" if e["what"] == "encode" else f"{e['T']} tokens x {HKV} heads"
        print(f"{label:>28} ({size}): {e['ms'] * 1e3:8.1f} us {e['TBps']:5.2f} TB/s "
              f"({100 * e['TBps'] / cb:3.0f}% of copy)")
    print("host time per call (us): " + "; ".join(f"{k} {v:.1f}" for k, v in result["host_us"].items()))


def run(args) -> int:
    if not torch.cuda.is_available():
        raise ValueError("tq-deploy bench gpu needs a CUDA device")
    from tq_deploy import cuda as tq_cuda

    if not tq_cuda.available():
        raise ValueError(f"tq-deploy bench gpu needs libtq_deploy_cuda.so: {tq_cuda.unavailable_reason()}")
    path = args.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None)
    if path:
        from tq_deploy.files import check_writable

        check_writable(path, "--json")  # before the benchmarks, not after them
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        configs = [parse_bits(b) for b in args.bits.split(",")]
    except ValueError:
        raise ValueError(f"--shapes {args.shapes!r} / --bits {args.bits!r}: expected e.g. 8x32768,1x131072 and "
                         "4,3,k6v4") from None
    if args.splits:
        rows = bench_splits(shapes, configs, l2)
        if path:
            from tq_deploy.files import write_text

            write_text(path, json.dumps({"device": props.name, "splits": rows}, indent=1))
        print_splits(rows)
        return 0
    trt = not args.no_trt and _trt_available()
    copy_bw = copy_bandwidth()
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write)", flush=True)
    result = {"device": props.name, "copy_TBps": copy_bw / 1e12,
              "config": {"Hq": HQ, "Hkv": HKV, "D": DIM, "block_size": BLOCK, "timing": "do_bench median"},
              "attention": bench_attention(shapes, configs, l2, args.quick, trt)}
    result["other_shapes"] = [] if args.quick else bench_other_shapes(8, 32768, l2, True)
    result["encode"] = bench_encode(1 << 20, DIM, configs)
    result["cache_update"] = bench_cache_update(1 << 17, HKV, DIM, [c for c in configs if c in ((4, 4), (2, 2),
                                                                                                 (3, 3), (6, 4))])
    result["host_us"] = host_cost_us()
    if path:
        from tq_deploy.files import write_text

        write_text(path, json.dumps(result, indent=1))
    print_tables(result, configs)
    return 0
