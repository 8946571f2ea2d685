"""Prefill attention (TQPagedPrefill) on a CUDA GPU against torch fp16 SDPA with a causal mask.

    tq-deploy bench prefill [--shapes 1x4096,8x2048,1x32768] [--bits 4]

A whole prompt of S tokens per sequence attends causally to itself, Hq=32, Hkv=8, D=128, block 16:
  SDPA      the fastest torch fp16 F.scaled_dot_product_attention(is_causal=True) variant (flash,
            efficient, cuDNN; GQA through enable_gqa) on dense K/V
  ours      tq_deploy.dispatch.paged_prefill on the paged TurboQuant cache (the backend the dispatcher
            picks: Triton's flash-style prefill on a GPU), the prompt's codes already in the cache
  x         SDPA time / ours
Medians of CUDA-event timings (triton.testing.do_bench). Each kernel is first checked against the
PyTorch reference on a short prompt (relative error < 5e-3).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tq_deploy.bench.gpu import BLOCK, DIM, HKV, HQ, _median_ms, _sdpa_backends, constants, make_tq_inputs, parse_bits

CHECK_TOL = 5e-3


def add_arguments(ap) -> None:
    ap.add_argument("--shapes", default="1x4096,8x2048,1x32768", help="prompts BxS (default 1x4096,8x2048,1x32768)")
    ap.add_argument("--bits", default="4", help="key/value widths: N or kXvY (default 4)")


def _inputs(batch, seq, k_bits, v_bits, seed=0):
    """The decode benchmark's random paged cache of ``batch`` prompts of ``seq`` tokens, with a query row
    per prompt token (fp16) and query_start."""
    _, k_codes, k_norms, v_codes, v_norms, tables, ctx = make_tq_inputs(batch, seq, HQ, HKV, DIM, BLOCK, k_bits,
                                                                        v_bits, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    query = torch.randn(batch * seq, HQ, DIM, device="cuda", generator=g, dtype=torch.float16)
    starts = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * seq
    return query, k_codes, k_norms, v_codes, v_norms, tables, ctx, starts


def _check(k_bits, v_bits) -> float:
    from tq_deploy import dispatch
    from tq_deploy.reference.paged import paged_prefill_reference

    rot, kcb, vcb = constants(DIM, k_bits, v_bits)
    args = _inputs(2, 70, k_bits, v_bits, seed=1)
    ours = dispatch.paged_prefill(*args, rot, kcb, vcb, k_bits, v_bits).float()
    ref = paged_prefill_reference(*(a.cpu() for a in args), rot.cpu(), kcb.cpu(), vcb.cpu(), k_bits, v_bits).float()
    return float((ours.cpu() - ref).norm() / ref.norm())


def _sdpa_ms(batch, seq) -> tuple[str, float]:
    from torch.nn.attention import sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(batch, HQ, seq, DIM, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(batch, HKV, seq, DIM, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(batch, HKV, seq, DIM, device="cuda", dtype=torch.float16, generator=g)
    best = ("-", float("nan"))
    for name, backend in _sdpa_backends().items():
        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            call()
            ms = _median_ms(call, warmup=5, rep=50)
        except RuntimeError as exc:
            print(f"  sdpa {name} {batch}x{seq}: not available ({str(exc).splitlines()[0][:100]})", file=sys.stderr)
            continue
        if not best[1] <= ms:
            best = (name, ms)
    return best


def run(args) -> int:
    from tq_deploy import dispatch

    if not torch.cuda.is_available():
        raise ValueError("bench prefill needs a CUDA device, expected torch.cuda.is_available()")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    k_bits, v_bits = parse_bits(args.bits)
    error = _check(k_bits, v_bits)
    if not error < CHECK_TOL:
        raise RuntimeError(f"paged_prefill relative error {error:.2e} against the reference, expected < {CHECK_TOL}")
    rot, kcb, vcb = constants(DIM, k_bits, v_bits)
    rows = []
    for batch, seq in shapes:
        inputs = _inputs(batch, seq, k_bits, v_bits)
        from tq_deploy.reference.checks import check_paged_prefill

        backend = dispatch.backend_for("paged_prefill", check_paged_prefill(*inputs, rot, kcb, vcb, k_bits, v_bits,
                                                                            check_data=False))
        ours = _median_ms(lambda: dispatch.paged_prefill(*inputs, rot, kcb, vcb, k_bits, v_bits), warmup=3, rep=20)
        inputs = None  # the cache copies go before SDPA allocates its own
        torch.cuda.empty_cache()
        name, sdpa = _sdpa_ms(batch, seq)
        rows.append((f"{batch}x{seq}", ours, backend, name, sdpa))
        print(f"{batch}x{seq}: ours {ours:.3f} ms, SDPA causal {name} {sdpa:.3f} ms", flush=True)
    print()
    print(f"prefill attention, {torch.cuda.get_device_name()}, Hq={HQ} Hkv={HKV} D={DIM} block {BLOCK}, "
          f"k{k_bits}v{v_bits}, fp16 queries; check vs reference: relative error {error:.1e}")
    print(f"{'prompt':<10} {'ours ms':>10} {'backend':>10} {'SDPA causal ms':>15} {'variant':>10} {'x':>6}")
    for shape, ours, backend, name, sdpa in rows:
        print(f"{shape:<10} {ours:>10.3f} {backend:>10} {sdpa:>15.3f} {name:>10} {sdpa / ours:>6.2f}")
    return 0
