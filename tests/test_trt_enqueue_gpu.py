"""The TensorRT plugins' runtime path on a real GPU, without TensorRT.

Each test drives a plugin through libtq_trt_harness the way TensorRT does around an engine
(creator -> createPlugin(build) -> configurePlugin -> serialized fields -> createPlugin(runtime)
-> attachToContext -> onShapeChange -> enqueue) on torch CUDA tensors, and compares the result
with the pure-PyTorch reference on fresh random inputs and odd shapes. (TensorRT-RTX refuses the
H200, so this is how the CUDA kernels behind the plugins are validated there.)
"""

from __future__ import annotations

import pytest
import torch

from tq_deploy import ops
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.paged import cache_update_reference, paged_attention_reference
from tq_deploy.reference.quantizer import decode_reference, encode_reference
from tq_deploy.reference.rotation import make_rotation
from tq_deploy.runtime.trt_harness import harness_enqueue

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _libraries(trt_libraries):
    """Every test here drives the plugin through the harness: skip the module without them."""


def cuda(t):
    return t.contiguous().cuda()


def enqueue(op, attrs, inputs, outputs):
    harness_enqueue(op, attrs, [cuda(t) if not t.is_cuda else t for t in inputs], outputs,
                       stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()


def unpacked_mismatch(a: torch.Tensor, b: torch.Tensor, bits: int, dim: int) -> float:
    from tq_deploy.reference.packing import unpack_codes

    ua, ub = unpack_codes(a.cpu(), bits, dim), unpack_codes(b.cpu(), bits, dim)
    return (ua != ub).float().mean().item()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim,dtype", [(128, torch.float32), (72, torch.float16), (37, torch.float32),
                                       (64, torch.float16)])
def test_encode_decode_match_reference(bits, dim, dtype, gen):
    rows = 301
    rotation = make_rotation(dim, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    codebook = lloyd_max_codebook(dim, bits)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
    x[7] = 0  # zero vector: norm 0, y = 0
    p = ops.packed_size(dim, bits)
    codes = torch.empty(rows, p, dtype=torch.uint8, device="cuda")
    norms = torch.empty(rows, dtype=torch.float32, device="cuda")
    enqueue("TQEncode", {"bits": bits}, [x, rotation, codebook], [codes, norms])
    ref_codes, ref_norms = encode_reference(x, rotation, codebook, bits)
    torch.testing.assert_close(norms.cpu(), ref_norms, rtol=1e-5, atol=1e-6)
    # float32 sums in another order can flip a coordinate lying on a boundary; nothing more.
    assert unpacked_mismatch(codes, ref_codes, bits, dim) < 2e-3
    if (dim * bits) % 8:  # padding bits of the last byte stay zero
        pad = 8 - (dim * bits) % 8
        assert int((codes[:, -1].cpu() >> (8 - pad)).max()) == 0

    x_hat = torch.empty(rows, dim, dtype=torch.float32, device="cuda")
    enqueue("TQDecode", {"bits": bits}, [ref_codes, ref_norms, rotation, codebook], [x_hat])
    torch.testing.assert_close(x_hat.cpu(), decode_reference(ref_codes, ref_norms, rotation, codebook, bits),
                               rtol=1e-4, atol=1e-4)


def make_cache(n, b, hkv, dim, k_bits, v_bits, gen):
    return (torch.randint(0, 256, (n, b, hkv, ops.packed_size(dim, k_bits)), dtype=torch.uint8, generator=gen),
            torch.rand(n, b, hkv, generator=gen) + 0.5,
            torch.randint(0, 256, (n, b, hkv, ops.packed_size(dim, v_bits)), dtype=torch.uint8, generator=gen),
            torch.rand(n, b, hkv, generator=gen) + 0.5)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("k_bits,v_bits,dim,dtype", [(4, 4, 128, torch.float16), (3, 2, 72, torch.float32),
                                                     (1, 3, 40, torch.float32), (8, 4, 128, torch.float16),
                                                     (6, 5, 64, torch.float16)])
def test_cache_update_matches_reference(k_bits, v_bits, dim, dtype, in_place, gen):
    n, b, hkv, t = 9, 16, 3, 37
    rotation = make_rotation(dim, seed=3)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    cache = make_cache(n, b, hkv, dim, k_bits, v_bits, gen)
    key = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    value = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    slots = torch.randperm(n * b, generator=gen)[:t].long()
    slots[::5] = -1  # padding tokens
    slots[3] = slots[10] = int(slots[20])  # one slot named three times: the last token wins
    expected = cache_update_reference(key, value, slots, *[c.clone() for c in cache], rotation, kcb, vcb,
                                      k_bits, v_bits)
    inputs = [cuda(key), cuda(value), cuda(slots), *[cuda(c) for c in cache], cuda(rotation), cuda(kcb), cuda(vcb)]
    outputs = inputs[3:7] if in_place else [torch.full_like(c, 7) if c.dtype == torch.uint8 else torch.zeros_like(c)
                                            for c in inputs[3:7]]
    enqueue("TQCacheUpdate", {"k_bits": k_bits, "v_bits": v_bits}, inputs, outputs)
    got = [o.cpu() for o in outputs]
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=1e-6)
    assert unpacked_mismatch(got[0], expected[0], k_bits, dim) < 2e-3
    assert unpacked_mismatch(got[2], expected[2], v_bits, dim) < 2e-3
    untouched = torch.ones(n * b, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(got[0].view(n * b, hkv, -1)[untouched], cache[0].view(n * b, hkv, -1)[untouched])


@pytest.mark.parametrize("k_bits,v_bits,hq,hkv,dim,dtype", [
    (4, 4, 32, 8, 128, torch.float16),
    (3, 2, 8, 2, 64, torch.float32),
    (2, 4, 12, 1, 80, torch.float32),   # group of 12: two passes over the 8-head chunk
    (1, 3, 5, 5, 40, torch.float16),    # no GQA, 3-bit values straddling bytes
    (8, 4, 32, 8, 128, torch.float16),  # 8-bit keys
    (6, 3, 16, 2, 64, torch.float16),
    (3, 3, 8, 8, 256, torch.float32),
])
def test_paged_attention_matches_reference(k_bits, v_bits, hq, hkv, dim, dtype, gen):
    b, m = 16, 9
    n = 40
    context = [0, 1, 17, 100, m * b]
    s = len(context)
    rotation = make_rotation(dim, seed=5)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    cache = make_cache(n, b, hkv, dim, k_bits, v_bits, gen)
    query = torch.randn(s, hq, dim, generator=gen).to(dtype)
    tables = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(s)]).int()
    tables[1, 1:] = -7  # entries past the context are never read
    lens = torch.tensor(context, dtype=torch.int32)
    scale = 0.0 if dtype == torch.float16 else 0.37
    expected = paged_attention_reference(query, *cache, tables, lens, rotation, kcb, vcb, k_bits, v_bits, scale)
    out = torch.empty(s, hq, dim, dtype=dtype, device="cuda")
    enqueue("TQPagedAttention", {"k_bits": k_bits, "v_bits": v_bits, "scale": scale},
            [query, *cache, tables, lens, rotation, kcb, vcb], [out])
    # fp16 queries: fp16 output (and the tensor-core kernel's fp16 q_rot and centroids); float32 queries
    # run the float32 kernel, held to float32 tolerances
    fp16_math = dtype != torch.float32
    tol = dict(rtol=2e-3, atol=2e-3) if fp16_math else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cpu(), expected, **tol)
    assert torch.count_nonzero(out[0]) == 0  # empty context -> zeros


def test_plugin_rejects_inconsistent_shapes(gen):
    dim, bits = 64, 3
    rotation = make_rotation(dim)
    codebook = lloyd_max_codebook(dim, bits)
    x = torch.randn(4, dim, generator=gen)
    codes = torch.empty(4, ops.packed_size(dim, bits) + 1, dtype=torch.uint8, device="cuda")  # wrong P is fine for
    norms = torch.empty(4, device="cuda")                                                     # the inputs' checks
    with pytest.raises(RuntimeError, match="rejected the shapes|codebook"):
        enqueue("TQEncode", {"bits": bits}, [x, rotation, codebook[:4]], [codes, norms])
    with pytest.raises(RuntimeError, match="createPlugin"):
        enqueue("TQEncode", {"bits": 9}, [x, rotation, codebook], [codes, norms])


def test_attention_plugin_runs_the_pytorch_paths_kernel_with_its_workspace(gen):
    """The plugin reports the split-K workspace and calls the same launcher as tq_deploy.cuda:
    on the same inputs the outputs are bit-identical (tensor-core shapes, long context)."""
    from tq_deploy import cuda as tq_cuda
    from tq_deploy.reference.checks import check_paged_attention

    if not tq_cuda.available():
        pytest.skip(tq_cuda.unavailable_reason())
    b, n, hq, hkv, dim = 16, 600, 32, 8, 128
    rotation = make_rotation(dim, seed=11)
    cb = lloyd_max_codebook(dim, 4)
    cache = [cuda(c) for c in make_cache(n, b, hkv, dim, 4, 4, gen)]
    tables = cuda(torch.stack([torch.randperm(n, generator=gen)[:300] for _ in range(2)]).int())
    lens = cuda(torch.tensor([4800, 3001], dtype=torch.int32))
    query = cuda(torch.randn(2, hq, dim, generator=gen).half())
    args = [query, *cache, tables, lens, cuda(rotation), cuda(cb), cuda(cb)]
    out = torch.empty_like(query)
    nbytes = harness_enqueue("TQPagedAttention", {"k_bits": 4, "v_bits": 4, "scale": 0.0}, args, [out],
                             stream=torch.cuda.current_stream().cuda_stream)
    assert nbytes > 0, "the attention plugin must ask for its split-K workspace"
    direct = tq_cuda.paged_attention(check_paged_attention(*args, 4, 4, check_data=False))
    torch.cuda.synchronize()
    assert torch.equal(out, direct)


@pytest.mark.parametrize("dim,dtype", [(128, torch.float16), (64, torch.float32)])
def test_float16_norms_cache_update_then_attention(dim, dtype, gen):
    """A cache with float16 norms (ops.py: TN): the update stores the reference's norms to one float16
    step, and the attention over the plugin's own cache matches the reference over that cache."""
    n, b, hkv, hq, t, k_bits, v_bits = 8, 16, 2, 8, 60, 5, 4
    rotation = make_rotation(dim, seed=4)
    kcb, vcb = lloyd_max_codebook(dim, k_bits), lloyd_max_codebook(dim, v_bits)
    cache = [c.half() if c.dtype == torch.float32 else c for c in make_cache(n, b, hkv, dim, k_bits, v_bits, gen)]
    key = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    value = torch.randn(t, hkv, dim, generator=gen).to(dtype)
    slots = torch.randperm(n * b, generator=gen)[:t].long()
    expected = cache_update_reference(key, value, slots, *[c.clone() for c in cache], rotation, kcb, vcb,
                                      k_bits, v_bits)
    outputs = [cuda(c) for c in cache]
    enqueue("TQCacheUpdate", {"k_bits": k_bits, "v_bits": v_bits},
            [key, value, slots, *outputs, rotation, kcb, vcb], outputs)
    got = [o.cpu() for o in outputs]
    for i in (1, 3):
        assert got[i].dtype == torch.float16
        torch.testing.assert_close(got[i].float(), expected[i].float(), rtol=2.0 ** -10, atol=0)
    tables = torch.randperm(n, generator=gen).reshape(2, 4).int()
    lens = torch.tensor([50, 7], dtype=torch.int32)
    query = torch.randn(2, hq, dim, generator=gen).to(dtype)
    want = paged_attention_reference(query.float(), *got, tables, lens, rotation, kcb, vcb, k_bits, v_bits)
    out = torch.empty(2, hq, dim, dtype=dtype, device="cuda")
    enqueue("TQPagedAttention", {"k_bits": k_bits, "v_bits": v_bits},
            [query, *outputs, tables, lens, rotation, kcb, vcb], [out])
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.float().cpu(), want, **tol)
