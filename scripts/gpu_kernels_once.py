"""Every CUDA kernel of the project once, on small shapes, checked against the reference: the
program the GPU visit runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

    python scripts/gpu_kernels_once.py [--only cuda|trt|ort]

cuda  encode (tensor-core and generic), decode, cache update (with duplicate slots: a prefill's
      many tokens and a decode step's few), the paged attention on the tensor-core kernel (split-K
      merged by the last CTA; blocks of 8 and 24 tokens, 16 query heads per KV head; D 96 and 80
      with codes widened from 5 and 3 bits), the generic kernel (D 320), the key mean and float16
      norms (odd-length and misaligned norm arrays, codes ending off a word)
trt   the TensorRT plugins' enqueue through the harness (libtq_trt_harness)
ort   the ONNX Runtime CUDA EP kernels (onnxruntime-gpu and a CUDA build of the library)
Exits non-zero when a result is wrong; prints one line per kernel.
"""

from __future__ import annotations

import argparse
import sys

import torch


def rel(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def cuda_kernels(gen) -> list[str]:
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference import checks, lloyd_max_codebook, make_rotation
    from tq_deploy.reference.paged import allocate_cache, cache_update_reference, paged_attention_reference
    from tq_deploy.reference.quantizer import decode_reference

    problems = []
    for dim, bits, dtype in ((128, 4, torch.float16), (128, 3, torch.bfloat16), (96, 6, torch.float32)):
        rot, cb = make_rotation(dim, seed=1), lloyd_max_codebook(dim, bits)
        x = torch.randn(300, dim, generator=gen).to(dtype)
        codes, norms = tq_cuda.encode(checks.check_encode(x.cuda(), rot.cuda(), cb.cuda(), bits))
        x_hat = tq_cuda.decode(checks.check_decode(codes, norms, rot.cuda(), cb.cuda(), bits))
        err = rel(x_hat, decode_reference(codes.cpu(), norms.cpu(), rot, cb, bits))
        print(f"encode+decode D={dim} {bits}-bit {dtype}: decode error {err:.1e}")
        if err > 1e-5:
            problems.append(f"decode D={dim}")
    for dim, hq, hkv, block, kb, vb, ctx in ((128, 32, 8, 16, 4, 4, [700, 33]), (128, 8, 2, 16, 3, 2, [5, 90]),
                                               (64, 8, 1, 8, 5, 3, [70, 1]), (128, 32, 2, 24, 4, 4, [300, 5]),
                                               (96, 16, 1, 16, 5, 3, [70, 1]), (80, 8, 2, 24, 3, 5, [90, 7]),
                                               (320, 4, 2, 16, 4, 3, [50, 2])):
        rot = make_rotation(dim, seed=2)
        kcb, vcb = lloyd_max_codebook(dim, kb), lloyd_max_codebook(dim, vb)
        width = max(-(-c // block) for c in ctx)
        n = len(ctx) * width + 2
        cache = allocate_cache(n, block, hkv, dim, kb, vb)
        slots = torch.randperm(n * block, generator=gen)[:n * block - 5]
        slots[3] = slots[10]  # a duplicate slot
        key = torch.randn(len(slots), hkv, dim, generator=gen).half()
        value = (torch.randn(len(slots), hkv, dim, generator=gen) * 0.5).half()
        cache_update_reference(key, value, slots, *cache.tensors(), rot, kcb, vcb, kb, vb)
        ours = [t.cuda() for t in allocate_cache(n, block, hkv, dim, kb, vb).tensors()]
        tq_cuda.cache_update(checks.check_cache_update(key.cuda(), value.cuda(), slots.cuda(), *ours, rot.cuda(),
                                                       kcb.cuda(), vcb.cuda(), kb, vb, check_data=False))
        err = rel(ours[1], cache.tensors()[1])
        tables = torch.randperm(n, generator=gen)[: len(ctx) * width].reshape(len(ctx), width).int()
        lens = torch.tensor(ctx, dtype=torch.int32)
        q = torch.randn(len(ctx), hq, dim, generator=gen).half()
        want = paged_attention_reference(q.float(), *cache.tensors(), tables, lens, rot, kcb, vcb, kb, vb)
        a = checks.check_paged_attention(q.cuda(), *[t.cuda() for t in cache.tensors()], tables.cuda(), lens.cuda(),
                                         rot.cuda(), kcb.cuda(), vcb.cuda(), kb, vb, check_data=False)
        got = tq_cuda.paged_attention(a, tokens_per_split=32)
        att = rel(got, want)
        print(f"cache update + attention D={dim} G={hq // hkv} block {block} k{kb}v{vb} "
              f"({tq_cuda.paged_attention_path(a)}): norms error {err:.1e}, attention error {att:.1e}")
        if err > 1e-6 or att > 5e-3:
            problems.append(f"attention D={dim} k{kb}v{vb}")
        if dim in (64, 128) and hq // hkv in (4, 8):  # the key mean (optional inputs) on the same cache
            mean = torch.randn(hkv, dim, generator=gen) * 0.5
            freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
            want = paged_attention_reference(q.float(), *cache.tensors(), tables, lens, rot, kcb, vcb, kb, vb, 0.0,
                                             mean, freq)
            a = checks.check_paged_attention(q.cuda(), *[t.cuda() for t in cache.tensors()], tables.cuda(),
                                             lens.cuda(), rot.cuda(), kcb.cuda(), vcb.cuda(), kb, vb, 0.0,
                                             mean.cuda(), freq.cuda(), check_data=False)
            att = rel(tq_cuda.paged_attention(a, tokens_per_split=32), want)
            print(f"attention with the key mean D={dim} G={hq // hkv} k{kb}v{vb} ({tq_cuda.paged_attention_path(a)}): "
                  f"attention error {att:.1e}")
            if att > 5e-3:
                problems.append(f"attention with the key mean D={dim} k{kb}v{vb}")
    # a decode step's cache update: few tokens, duplicates checked inline (no last-writer launch)
    rot, cb = make_rotation(128, seed=3), lloyd_max_codebook(128, 4)
    cache = allocate_cache(4, 16, 8, 128, 4, 4)
    slots = torch.tensor([5, 17, 40, 5, 63, 2, 17, 30])  # slots 5 and 17 twice: the later token wins
    key, value = torch.randn(8, 8, 128, generator=gen), torch.randn(8, 8, 128, generator=gen)
    cache_update_reference(key, value, slots, *cache.tensors(), rot, cb, cb, 4, 4)
    ours = [t.cuda() for t in allocate_cache(4, 16, 8, 128, 4, 4).tensors()]
    tq_cuda.cache_update(checks.check_cache_update(key.cuda(), value.cuda(), slots.cuda(), *ours, rot.cuda(), cb.cuda(),
                                                   cb.cuda(), 4, 4, check_data=False))
    err = max(rel(ours[1], cache.tensors()[1]), rel(ours[3], cache.tensors()[3]))
    print(f"decode-step cache update (8 tokens, 2 duplicates): norms error {err:.1e}")
    if err > 1e-6:
        problems.append("decode-step cache update")
    return problems + half_norm_kernels(gen)


def half_norm_kernels(gen) -> list[str]:
    """Float16 cache norms at sizes where an over-read shows under memcheck (run it with
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation): odd-length and 2-byte
    misaligned norm arrays, block size 1, D 72 3-bit codes whose rows end off a word (raw path), and
    float32 queries (the generic kernel); the cache update, then the attention against the reference on
    the cache the GPU wrote."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference import checks, lloyd_max_codebook, make_rotation
    from tq_deploy.reference.paged import allocate_cache, cache_update_reference, paged_attention_reference

    problems = []
    for n, block, hkv, dim, hq, kb, vb, dtype, shift in ((5, 16, 1, 128, 4, 4, 3, torch.float16, 0),
                                                         (7, 1, 3, 64, 6, 3, 5, torch.float16, 0),
                                                         (3, 3, 1, 96, 2, 4, 4, torch.bfloat16, 0),
                                                         (3, 3, 1, 72, 2, 3, 5, torch.float16, 0),
                                                         (5, 16, 1, 128, 4, 4, 3, torch.float32, 0),
                                                         (5, 16, 1, 128, 4, 4, 3, torch.float16, 1)):
        rot = make_rotation(dim, seed=4).cuda()
        kcb, vcb = lloyd_max_codebook(dim, kb).cuda(), lloyd_max_codebook(dim, vb).cuda()

        def norms():  # shift 1: the array starts 2 bytes past its allocation's start
            return torch.zeros(n * block * hkv + shift, dtype=torch.float16, device="cuda")[shift:].view(n, block, hkv)

        cache = [torch.zeros(n, block, hkv, (dim * kb + 7) // 8, dtype=torch.uint8, device="cuda"), norms(),
                 torch.zeros(n, block, hkv, (dim * vb + 7) // 8, dtype=torch.uint8, device="cuda"), norms()]
        key = torch.randn(n * block, hkv, dim, generator=gen).to(dtype).cuda()
        slots = torch.arange(n * block, device="cuda")
        tq_cuda.cache_update(checks.check_cache_update(key, key * 2, slots, *cache, rot, kcb, vcb, kb, vb))
        tables = torch.arange(n, dtype=torch.int32, device="cuda").view(1, n)
        lens = torch.tensor([n * block], dtype=torch.int32, device="cuda")
        q = torch.randn(1, hq, dim, generator=gen).to(dtype).cuda()
        a = checks.check_paged_attention(q, *cache, tables, lens, rot, kcb, vcb, kb, vb, check_data=False)
        got = tq_cuda.paged_attention(a, tokens_per_split=16)
        want = paged_attention_reference(q.float().cpu(), *[t.cpu() for t in cache], tables.cpu(), lens.cpu(),
                                         rot.cpu(), kcb.cpu(), vcb.cpu(), kb, vb)
        ref = allocate_cache(n, block, hkv, dim, kb, vb, norm_dtype=torch.float16).tensors()
        cache_update_reference(key.cpu(), key.cpu() * 2, slots.cpu(), *ref, rot.cpu(), kcb.cpu(), vcb.cpu(), kb, vb)
        norm_err = max(rel(cache[1], ref[1]), rel(cache[3], ref[3]))
        att = rel(got, want)
        print(f"float16 norms D={dim} block {block} k{kb}v{vb} {dtype} shift {shift} "
              f"({tq_cuda.paged_attention_path(a)}): norms error {norm_err:.1e}, attention error {att:.1e}")
        if norm_err > 1e-3 or att > 5e-3:  # 1e-3: a float16 norm may round the other way at a tie
            problems.append(f"float16 norms D={dim} block {block}")
    return problems


def trt_plugins(gen) -> list[str]:
    from tq_deploy.reference import lloyd_max_codebook, make_rotation
    from tq_deploy.reference.paged import paged_attention_reference
    from tq_deploy.runtime.trt_harness import harness_enqueue

    dim, hq, hkv, block, bits = 128, 32, 8, 16, 4
    rot, cb = make_rotation(dim, seed=3), lloyd_max_codebook(dim, bits)
    n = 80
    caches = [torch.randint(0, 256, (n, block, hkv, 64), dtype=torch.uint8, generator=gen),
              torch.rand(n, block, hkv, generator=gen) + 0.5,
              torch.randint(0, 256, (n, block, hkv, 64), dtype=torch.uint8, generator=gen),
              torch.rand(n, block, hkv, generator=gen) + 0.5]
    tables = torch.randperm(n, generator=gen)[:78].reshape(2, 39).int()
    lens = torch.tensor([620, 17], dtype=torch.int32)
    q = torch.randn(2, hq, dim, generator=gen).half()
    out = torch.empty(2, hq, dim, dtype=torch.float16, device="cuda")
    inputs = [t.cuda().contiguous() for t in (q, *caches, tables, lens, rot, cb, cb)]
    harness_enqueue("TQPagedAttention", {"k_bits": bits, "v_bits": bits, "scale": 0.0}, inputs, [out],
                    stream=torch.cuda.current_stream().cuda_stream)
    err = rel(out, paged_attention_reference(q.float(), *caches, tables, lens, rot, cb, cb, bits, bits))
    print(f"TensorRT plugin TQPagedAttention enqueue: error {err:.1e}")
    return [] if err < 5e-3 else ["trt attention"]


def ort_kernels(gen) -> list[str]:
    import numpy as np

    from tq_deploy.export.single_op import initializer_arrays, make_op_model
    from tq_deploy.reference.paged import paged_attention_reference
    from tq_deploy.runtime.session import make_session

    model = make_op_model("TQPagedAttention", head_dim=128, bits=4, num_q_heads=8, num_kv_heads=2, dtype="float16")
    init = {k: torch.from_numpy(v.copy()) for k, v in initializer_arrays(model).items()}
    n, block = 40, 16
    caches = [torch.randint(0, 256, (n, block, 2, 64), dtype=torch.uint8, generator=gen),
              torch.rand(n, block, 2, generator=gen) + 0.5,
              torch.randint(0, 256, (n, block, 2, 64), dtype=torch.uint8, generator=gen),
              torch.rand(n, block, 2, generator=gen) + 0.5]
    tables = torch.randperm(n, generator=gen)[:38].reshape(2, 19).int()
    lens = torch.tensor([300, 1], dtype=torch.int32)
    q = torch.randn(2, 8, 128, generator=gen).half()
    session = make_session(model.SerializeToString(), provider="cuda")
    names = ["query", "k_codes", "k_norms", "v_codes", "v_norms", "block_tables", "context_lens"]
    (out,) = session.run(None, {k: v.numpy() for k, v in zip(names, (q, *caches, tables, lens))})
    want = paged_attention_reference(q.float(), *caches, tables, lens, init["rotation"], init["k_codebook"],
                                     init["v_codebook"], 4, 4)
    err = rel(torch.from_numpy(np.asarray(out)), want)
    print(f"ORT CUDA EP TQPagedAttention: error {err:.1e}")
    return [] if err < 5e-3 else ["ort attention"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cuda", "trt", "ort"])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    parts = {"cuda": cuda_kernels, "trt": trt_plugins, "ort": ort_kernels}
    problems = []
    for name, fn in parts.items():
        if args.only in (None, name):
            problems += fn(gen)
    torch.cuda.synchronize()
    if problems:
        print("WRONG: " + ", ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
