"""TQPagedPrefill's PyTorch reference: causal multi-token attention over the paged cache.

The oracle is independent of tq_deploy.reference.paged's attention code: it decodes every cached
key and value to a full vector (decode_reference: norm * c[idx] @ Pi), walks each sequence's block
table token by token and runs a plain causal softmax per query row in float64.
"""

from __future__ import annotations

import pytest
import torch

from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.paged import paged_attention_reference, paged_prefill_reference
from tq_deploy.reference.quantizer import decode_reference
from tq_deploy.reference.rotation import make_rotation
from tq_deploy.validate.inputs import CACHE_NAMES, default_prefill_lens, paged_prefill_inputs

ARG_NAMES = ("query", *CACHE_NAMES, "block_tables", "context_lens", "query_start")


def make_prefill(gen, *, dim, hq, hkv, block_size, k_bits, v_bits, lens=None, counts=None,
                 dtype=torch.float32, rotation="haar"):
    """(inputs by name, rotation, k_codebook, v_codebook): paged_prefill_inputs' draw (unused slots NaN,
    unused table entries junk) for a given shape."""
    config = {"block_size": block_size, "head_dim": dim, "num_kv_heads": hkv, "num_q_heads": hq, "k_bits": k_bits,
              "v_bits": v_bits, "dtype": "float16" if dtype == torch.float16 else "float32"}
    inits = {"rotation": make_rotation(dim, rotation, int(torch.randint(0, 10_000, (1,), generator=gen))),
             "k_codebook": lloyd_max_codebook(dim, k_bits), "v_codebook": lloyd_max_codebook(dim, v_bits)}
    inputs = paged_prefill_inputs(config, inits, gen, context_lens=lens, query_lens=counts)
    inputs["query"] = inputs["query"].to(dtype)
    return inputs, inits["rotation"], inits["k_codebook"], inits["v_codebook"]


def call_args(inputs, rotation, k_codebook, v_codebook, k_bits, v_bits):
    return (*(inputs[n] for n in ARG_NAMES), rotation, k_codebook, v_codebook, k_bits, v_bits)


def causal_oracle(inputs, rotation, k_codebook, v_codebook, k_bits, v_bits, scale=0.0):
    """Decode K and V, then per sequence and query row a plain softmax over tokens 0..position (float64)."""
    query = inputs["query"]
    t, hq, dim = query.shape
    keys = decode_reference(inputs["k_codes"], inputs["k_norms"], rotation, k_codebook, k_bits).double()
    values = decode_reference(inputs["v_codes"], inputs["v_norms"], rotation, v_codebook, v_bits).double()
    b, hkv = keys.shape[1], keys.shape[2]
    scale = scale or dim ** -0.5
    starts = inputs["query_start"].tolist()
    out = torch.zeros(t, hq, dim, dtype=torch.float64)
    for s, ctx in enumerate(inputs["context_lens"].tolist()):
        first, n = starts[s], starts[s + 1] - starts[s]
        blocks = [int(inputs["block_tables"][s, i // b]) for i in range(ctx)]
        k = torch.stack([keys[blocks[i], i % b] for i in range(ctx)]) if ctx else keys[:0, 0]  # [ctx, Hkv, D]
        v = torch.stack([values[blocks[i], i % b] for i in range(ctx)]) if ctx else values[:0, 0]
        for j in range(n):
            p = ctx - n + j
            for h in range(hq):
                g = h // (hq // hkv)
                scores = k[: p + 1, g] @ query[first + j, h].double() * scale
                out[first + j, h] = torch.softmax(scores, 0) @ v[: p + 1, g]
    return out


SHAPES = {  # dim, hq, hkv, block, k_bits, v_bits
    "gqa1-d64-b16": (64, 2, 2, 16, 4, 4),
    "gqa3-d128-b32": (128, 6, 2, 32, 3, 2),
    "gqa4-d64-b16-k2v5": (64, 8, 2, 16, 2, 5),
    "gqa8-d32-b8": (32, 8, 1, 8, 1, 3),
}


@pytest.mark.parametrize("name", SHAPES)
def test_prefill_reference_matches_the_causal_oracle(name, gen):
    dim, hq, hkv, b, kb, vb = SHAPES[name]
    inputs, rot, kcb, vcb = make_prefill(gen, dim=dim, hq=hq, hkv=hkv, block_size=b, k_bits=kb, v_bits=vb)
    assert inputs["query_start"].tolist() == [0, *torch.tensor(default_prefill_lens(b)[1]).cumsum(0).tolist()]
    out = paged_prefill_reference(*call_args(inputs, rot, kcb, vcb, kb, vb))
    assert out.shape == inputs["query"].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()  # NaN in every slot no context covers was never read
    torch.testing.assert_close(out.double(), causal_oracle(inputs, rot, kcb, vcb, kb, vb), rtol=1e-4, atol=1e-5)


def test_custom_scale_and_hadamard_rotation(gen):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=128, hq=4, hkv=4, block_size=16, k_bits=4, v_bits=2,
                                         lens=[40, 9], counts=[23, 9], rotation="hadamard")
    out = paged_prefill_reference(*call_args(inputs, rot, kcb, vcb, 4, 2), scale=0.3)
    torch.testing.assert_close(out.double(), causal_oracle(inputs, rot, kcb, vcb, 4, 2, scale=0.3),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_query_gives_output_in_its_dtype(dtype, gen):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=2, block_size=16, k_bits=3, v_bits=3,
                                         lens=[20, 3], counts=[5, 3])
    half = dict(inputs, query=inputs["query"].to(dtype))
    out = paged_prefill_reference(*call_args(half, rot, kcb, vcb, 3, 3))
    assert out.dtype == dtype
    widened = dict(inputs, query=half["query"].float())
    assert torch.equal(out, paged_prefill_reference(*call_args(widened, rot, kcb, vcb, 3, 3)).to(dtype))


def test_one_row_per_sequence_is_decode_attention(gen):
    """n_s = 1 everywhere: the prefill op is TQPagedAttention (a context of 0 has no row then)."""
    lens = [1, 17, 16, 33, 5]
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=8, hkv=2, block_size=16, k_bits=4, v_bits=2, lens=lens,
                                         counts=[1] * len(lens))
    out = paged_prefill_reference(*call_args(inputs, rot, kcb, vcb, 4, 2), scale=0.2)
    decode = paged_attention_reference(inputs["query"], *(inputs[n] for n in CACHE_NAMES), inputs["block_tables"],
                                       inputs["context_lens"], rot, kcb, vcb, 4, 2, 0.2)
    torch.testing.assert_close(out, decode, rtol=1e-5, atol=1e-6)


def test_chunks_equal_the_whole_prompt(gen):
    """Chunked prefill: the rows of the last chunk equal the same rows of a one-chunk prefill."""
    ctx, chunk = 45, 14
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=1, block_size=16, k_bits=3, v_bits=4, lens=[ctx],
                                         counts=[ctx])
    whole = paged_prefill_reference(*call_args(inputs, rot, kcb, vcb, 3, 4))
    last = dict(inputs, query=inputs["query"][ctx - chunk:], query_start=torch.tensor([0, chunk], dtype=torch.int32))
    torch.testing.assert_close(paged_prefill_reference(*call_args(last, rot, kcb, vcb, 3, 4)), whole[ctx - chunk:],
                               rtol=1e-5, atol=1e-6)
    # A chunk in the middle of the prompt: the cache holds the later tokens too, but the context ends at the chunk.
    mid = dict(inputs, query=inputs["query"][20:30], query_start=torch.tensor([0, 10], dtype=torch.int32),
               context_lens=torch.tensor([30], dtype=torch.int32))
    torch.testing.assert_close(paged_prefill_reference(*call_args(mid, rot, kcb, vcb, 3, 4)), whole[20:30],
                               rtol=1e-5, atol=1e-6)


def test_a_row_never_reads_its_own_future(gen):
    """NaN norms in the chunk's last token: every earlier row stays finite, the last row is NaN."""
    inputs, rot, kcb, vcb = make_prefill(gen, dim=64, hq=4, hkv=2, block_size=8, k_bits=4, v_bits=4, lens=[12, 6],
                                         counts=[5, 6])
    block = int(inputs["block_tables"][0, 11 // 8])
    for name in ("k_norms", "v_norms"):
        poisoned = {k: v.clone() for k, v in inputs.items()}
        poisoned[name][block, 11 % 8] = float("nan")
        out = paged_prefill_reference(*call_args(poisoned, rot, kcb, vcb, 4, 4))
        assert torch.isfinite(out[:4]).all() and torch.isnan(out[4]).all(), name
        assert torch.isfinite(out[5:]).all()  # the other sequence
        torch.testing.assert_close(out[:4], paged_prefill_reference(*call_args(inputs, rot, kcb, vcb, 4, 4))[:4],
                                   rtol=0, atol=0)


def test_empty_calls(gen):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=32, hq=2, hkv=1, block_size=8, k_bits=2, v_bits=2, lens=[0, 9],
                                         counts=[0, 0])
    assert inputs["query"].shape == (0, 2, 32)
    assert paged_prefill_reference(*call_args(inputs, rot, kcb, vcb, 2, 2)).shape == (0, 2, 32)
    none = dict(inputs, block_tables=inputs["block_tables"][:0], context_lens=inputs["context_lens"][:0],
                query_start=inputs["query_start"][:1])
    assert paged_prefill_reference(*call_args(none, rot, kcb, vcb, 2, 2)).shape == (0, 2, 32)


BAD_STARTS = {
    "length": ([0, 2, 5], r"query_start.shape=\(3,\), expected \(4,\)"),
    "first": ([1, 2, 3, 5], r"query_start runs from 1 to 5, expected 0 to T = query.shape\[0\] = 5"),
    "last": ([0, 2, 3, 4], r"query_start runs from 0 to 4, expected 0 to T = query.shape\[0\] = 5"),
    "decreasing": ([0, 3, 2, 5], r"query_start decreases \(\[0, 3, 2, 5\]...\), expected non-decreasing"),
    "over-context": ([0, 2, 4, 5], r"sequence 1 has 2 query rows \(query_start\), expected <= context_lens\[1\] = 1"),
}


@pytest.mark.parametrize("name", BAD_STARTS)
def test_bad_query_start_is_refused_naming_it(name, gen):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=32, hq=2, hkv=1, block_size=8, k_bits=2, v_bits=2,
                                         lens=[9, 1, 4], counts=[2, 1, 2])
    starts, message = BAD_STARTS[name]
    bad = dict(inputs, query_start=torch.tensor(starts, dtype=torch.int32))
    with pytest.raises(ValueError, match=message):
        paged_prefill_reference(*call_args(bad, rot, kcb, vcb, 2, 2))


def test_bad_metadata_is_refused_naming_it(gen):
    inputs, rot, kcb, vcb = make_prefill(gen, dim=32, hq=4, hkv=2, block_size=8, k_bits=2, v_bits=2,
                                         lens=[9, 1], counts=[2, 1])
    cases = {
        "query_start.dtype=torch.int64": dict(query_start=inputs["query_start"].long()),
        r"query.shape\[1\]=3 query heads, expected a multiple of the cache's num_kv_heads=2":
            dict(query=inputs["query"][:, :3]),
        r"context_lens.shape=\(3,\), expected \(2,\)": dict(context_lens=torch.tensor([9, 1, 1], dtype=torch.int32)),
        r"context_lens has 99, expected 0..24": dict(context_lens=torch.tensor([99, 1], dtype=torch.int32)),
        r"query has rank 2": dict(query=inputs["query"][:, 0]),
    }
    for message, override in cases.items():
        with pytest.raises(ValueError, match=message):
            paged_prefill_reference(*call_args(dict(inputs, **override), rot, kcb, vcb, 2, 2))
