"""Bad input (issue item 9): a ValueError that names the argument, the value seen and the value expected."""

from __future__ import annotations

import pytest
import torch

from tq_deploy.reference.codebook import lloyd_max_codebook, paper_bounds
from tq_deploy.reference.model import TQDecodeModel, TQModelConfig, example_inputs
from tq_deploy.reference.packing import pack_codes, unpack_codes
from tq_deploy.dispatch import cache_update, paged_attention
from tq_deploy.reference.paged import (
    allocate_cache,
    cache_update_reference,
    dense_attention_reference,
    paged_attention_reference,
)
from tq_deploy.reference.quantizer import (
    MixedPrecisionTurboQuant,
    TurboQuantMSE,
    TurboQuantProd,
    decode_reference,
    encode_reference,
)
from tq_deploy.reference.rotation import make_rotation

D, HKV, HQ, B, N, M = 64, 2, 4, 16, 4, 4
BAD_BITS = [0, 9, 2.5, True, "2"]


def expect_error(fn, *parts: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} missing from the message {message!r}"
    return message


@pytest.fixture
def setup(gen):
    rot = make_rotation(D, "haar", 1)
    kcb, vcb = lloyd_max_codebook(D, 4), lloyd_max_codebook(D, 2)
    cache = allocate_cache(N, B, HKV, D, 4, 2)
    key = torch.randn(3, HKV, D, generator=gen)
    cache_update_reference(key, key, torch.tensor([0, 17, 40]), *cache.tensors(), rot, kcb, vcb, 4, 2)
    return {
        "rot": rot, "kcb": kcb, "vcb": vcb, "cache": cache.tensors(),
        "query": torch.randn(2, HQ, D, generator=gen),
        "tables": torch.tensor([[0, 1, -1, -1], [2, 3, -1, -1]], dtype=torch.int32),
        "ctx": torch.tensor([20, 32], dtype=torch.int32),
        "key": key,
    }


def attend(s, fn=paged_attention_reference, **override):
    a = dict(query=s["query"], tables=s["tables"], ctx=s["ctx"], cache=s["cache"], kcb=s["kcb"], vcb=s["vcb"],
             rot=s["rot"], k_bits=4, v_bits=2)
    a.update(override)
    return lambda: fn(a["query"], *a["cache"], a["tables"], a["ctx"], a["rot"], a["kcb"], a["vcb"],
                      a["k_bits"], a["v_bits"])


def update(s, fn=cache_update_reference, **override):
    a = dict(key=s["key"], value=s["key"], slots=torch.tensor([1, 2, 3]), cache=s["cache"], kcb=s["kcb"],
             vcb=s["vcb"], rot=s["rot"], k_bits=4, v_bits=2)
    a.update(override)
    return lambda: fn(a["key"], a["value"], a["slots"], *a["cache"], a["rot"], a["kcb"], a["vcb"],
                      a["k_bits"], a["v_bits"])


# ------------------------------------------------------------------ bits


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bits_outside_1_to_8(bits, setup):
    seen, expected = f"bits={bits!r}", "expected one of (1, 2, 3, 4, 5, 6, 7, 8)"
    x = torch.randn(2, D)
    expect_error(lambda: TurboQuantMSE(D, bits), seen, expected)
    expect_error(lambda: TurboQuantProd(D, bits), seen, expected)
    expect_error(lambda: lloyd_max_codebook(D, bits), seen, expected)
    expect_error(lambda: paper_bounds(bits), seen, expected)
    expect_error(lambda: pack_codes(torch.zeros(D, dtype=torch.uint8), bits), seen, expected)
    expect_error(lambda: unpack_codes(torch.zeros(8, dtype=torch.uint8), bits, D), seen, expected)
    expect_error(lambda: encode_reference(x, setup["rot"], setup["kcb"], bits), seen, expected)
    expect_error(lambda: decode_reference(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2), setup["rot"],
                                          setup["kcb"], bits), seen, expected)
    expect_error(lambda: allocate_cache(N, B, HKV, D, bits, 2), f"k_bits={bits!r}", expected)
    expect_error(lambda: allocate_cache(N, B, HKV, D, 2, bits), f"v_bits={bits!r}", expected)
    expect_error(attend(setup, k_bits=bits), f"k_bits={bits!r}", expected)
    expect_error(attend(setup, v_bits=bits), f"v_bits={bits!r}", expected)
    expect_error(update(setup, k_bits=bits), f"k_bits={bits!r}", expected)
    expect_error(lambda: TQModelConfig(v_bits=bits), f"v_bits={bits!r}", expected)


def test_bits_that_disagree_with_the_cache_or_codebook(setup):
    # k_bits=3 with a cache packed for 4 bits: the packed size (24 vs 32 bytes) gives it away.
    expect_error(attend(setup, k_bits=3, kcb=lloyd_max_codebook(D, 3)), "k_codes.shape=(4, 16, 2, 32)",
                 "expected (4, 16, 2, 24)")
    expect_error(attend(setup, vcb=lloyd_max_codebook(D, 3)), "v_codebook has 8 entries", "2**bits = 4")
    expect_error(lambda: encode_reference(torch.randn(D), setup["rot"], setup["vcb"], 3),
                 "codebook has 4 entries", "2**bits = 8")


# ------------------------------------------------------------------ head dim


def test_wrong_head_dim(setup, gen):
    q = TurboQuantMSE(D, 3)
    x = torch.randn(5, 32, generator=gen)
    expect_error(lambda: q.encode(x), "x.shape[-1]=32", f"head_dim={D}")
    expect_error(lambda: q.quantize(x), "x.shape[-1]=32", f"head_dim={D}")
    expect_error(lambda: TurboQuantProd(D, 2).encode(x), "x.shape[-1]=32", f"head_dim={D}")
    expect_error(lambda: MixedPrecisionTurboQuant(D, 8, 3, 2).quantize(x), "x.shape[-1]=32", f"head_dim={D}")
    expect_error(lambda: encode_reference(x, setup["rot"], setup["kcb"], 4), "rotation.shape=(64, 64)",
                 "expected (32, 32)")
    codes, norms = q.encode(torch.randn(5, D, generator=gen))
    expect_error(lambda: decode_reference(codes[:, :-1], norms, q.rotation, q.codebook, 3),
                 "codes.shape=(5, 23)", "expected (5, 24)")
    expect_error(lambda: TurboQuantMSE(1, 2), "head_dim=1", ">= 2")
    expect_error(lambda: TurboQuantMSE(64.0, 2), "head_dim=64.0", "int")
    expect_error(lambda: lloyd_max_codebook(True, 2), "dim=True", "int")
    expect_error(lambda: TQModelConfig(head_dim=63), "head_dim=63", "even")
    # A query or key of the wrong head dim is named before the cache shapes are compared.
    expect_error(attend(setup, query=torch.randn(2, HQ, 32)), "query.shape[-1]=32", f"head_dim={D}")
    expect_error(update(setup, key=torch.randn(3, HKV, 32), value=torch.randn(3, HKV, 32)),
                 "key.shape[-1]=32", f"head_dim={D}")


# ------------------------------------------------------------------ dtype, rank, shape


def test_wrong_dtypes(setup):
    x = torch.randn(3, D)
    expect_error(lambda: encode_reference(x.long(), setup["rot"], setup["kcb"], 4), "x.dtype=torch.int64",
                 "torch.float16", "torch.bfloat16", "torch.float32")
    expect_error(lambda: TurboQuantMSE(D, 2).encode(x.double()), "x.dtype=torch.float64", "torch.float32")
    expect_error(lambda: encode_reference(x, setup["rot"].double(), setup["kcb"], 4), "rotation.dtype=torch.float64",
                 "torch.float32")
    expect_error(lambda: encode_reference(x, setup["rot"], setup["kcb"].half(), 4), "codebook.dtype=torch.float16",
                 "torch.float32")
    expect_error(lambda: pack_codes(torch.zeros(D, dtype=torch.int64), 2), "codes.dtype=torch.int64", "torch.uint8")
    expect_error(lambda: decode_reference(torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3).half(), setup["rot"],
                                          setup["kcb"], 4), "norms.dtype=torch.float16", "torch.float32")
    expect_error(attend(setup, tables=setup["tables"].long()), "block_tables.dtype=torch.int64", "torch.int32")
    expect_error(attend(setup, ctx=setup["ctx"].long()), "context_lens.dtype=torch.int64", "torch.int32")
    expect_error(attend(setup, query=setup["query"].int()), "query.dtype=torch.int32", "torch.float32")
    k_codes, k_norms, v_codes, v_norms = setup["cache"]
    expect_error(attend(setup, cache=(k_codes, k_norms.double(), v_codes, v_norms)), "k_norms.dtype=torch.float64",
                 "torch.float32", "torch.float16")
    expect_error(attend(setup, cache=(k_codes, k_norms.half(), v_codes, v_norms)), "v_norms.dtype=torch.float32",
                 "expected torch.float16 like k_norms")
    expect_error(attend(setup, cache=(k_codes.int(), k_norms, v_codes, v_norms)), "k_codes.dtype=torch.int32",
                 "torch.uint8")
    expect_error(update(setup, slots=torch.tensor([1.0, 2.0, 3.0])), "slot_mapping.dtype=torch.float32",
                 "torch.int32", "torch.int64")
    expect_error(update(setup, key=setup["key"].tolist()), "key is a list", "torch.Tensor")


def test_wrong_ranks(setup):
    expect_error(lambda: encode_reference(torch.tensor(1.0), make_rotation(1), lloyd_max_codebook(2, 1), 1),
                 "x has rank 0", "expected rank >= 1")
    expect_error(attend(setup, query=setup["query"][0]), "query has rank 2", "(4, 64)", "expected rank 3")
    expect_error(attend(setup, tables=setup["tables"].flatten()), "block_tables has rank 1", "expected rank 2")
    expect_error(attend(setup, ctx=setup["ctx"][None]), "context_lens has rank 2", "expected rank 1")
    k_codes, k_norms, v_codes, v_norms = setup["cache"]
    expect_error(attend(setup, cache=(k_codes[0], k_norms, v_codes, v_norms)), "k_codes has rank 3", "expected rank 4")
    expect_error(update(setup, key=setup["key"][0], value=setup["key"][0]), "key has rank 2", "expected rank 3")
    expect_error(update(setup, slots=torch.tensor([[1, 2, 3]])), "slot_mapping has rank 2", "expected rank 1")


def test_wrong_shapes(setup):
    key = setup["key"]
    expect_error(update(setup, value=key[:2]), "value.shape=(2, 2, 64)", "expected (3, 2, 64)")
    expect_error(update(setup, slots=torch.tensor([1, 2, 3, 4])), "slot_mapping.shape=(4,)", "expected (3,)")
    expect_error(update(setup, key=torch.randn(3, 3, D), value=torch.randn(3, 3, D)), "key.shape[1]=3",
                 "num_kv_heads=2")
    expect_error(attend(setup, ctx=setup["ctx"][:1]), "context_lens.shape=(1,)", "expected (2,)")
    expect_error(attend(setup, tables=setup["tables"][:1]), "block_tables.shape=(1, 4)", "expected (2, ")
    expect_error(attend(setup, query=torch.randn(2, 3, D)), "query.shape[1]=3", "num_kv_heads=2")
    k_codes, k_norms, v_codes, v_norms = setup["cache"]
    expect_error(attend(setup, cache=(k_codes, k_norms[:, :8], v_codes, v_norms)), "k_norms.shape=(4, 8, 2)",
                 "expected (4, 16, 2)")
    expect_error(attend(setup, cache=(k_codes, k_norms, v_codes[:2], v_norms)), "v_codes.shape=(2, 16, 2, 16)",
                 "expected (4, 16, 2, 16)")
    expect_error(attend(setup, rot=make_rotation(32)), "rotation.shape=(32, 32)", "expected (64, 64)")
    expect_error(lambda: unpack_codes(torch.zeros(3, 7, dtype=torch.uint8), 2, D), "packed.shape[-1]=7", "= 16")
    expect_error(lambda: TQDecodeModel(TQModelConfig())(torch.randn(2, 100), *[None] * 8), "hidden.shape=(2, 100)",
                 "(S, 256)")


# ------------------------------------------------------------------ block tables, context lengths, slots


@pytest.mark.parametrize("fn", [paged_attention_reference, dense_attention_reference, paged_attention])
def test_block_table_entries_in_use_must_be_valid_blocks(setup, fn):
    tables = setup["tables"].clone()
    tables[1, 1] = N  # used: ctx 32 needs two blocks
    expect_error(attend(setup, fn, tables=tables), "block_tables", f"entry {N}", f"0..{N - 1}")
    tables[1, 1] = -1
    expect_error(attend(setup, fn, tables=tables), "block_tables", "entry -1", f"0..{N - 1}")
    # Out-of-range entries past ceil(ctx / B) are never read, so they are fine.
    tables = setup["tables"].clone()
    tables[0, 2:] = 10**9
    tables[1, 2:] = -5
    attend(setup, fn, tables=tables)()
    tables[0, 1] = -3  # ctx 20 > 16: entry 1 is used
    expect_error(attend(setup, fn, tables=tables), "block_tables", "entry -3")


@pytest.mark.parametrize("fn", [paged_attention_reference, dense_attention_reference])
def test_context_lengths_within_capacity_and_not_negative(setup, fn):
    capacity = M * B
    full = torch.tensor([capacity, 1], dtype=torch.int32)
    tables = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    attend(setup, fn, ctx=full, tables=tables)()  # exactly full is fine
    over = torch.tensor([capacity + 1, 1], dtype=torch.int32)
    expect_error(attend(setup, fn, ctx=over, tables=tables), "context_lens", f"{capacity + 1}", f"0..{capacity}")
    negative = torch.tensor([5, -1], dtype=torch.int32)
    expect_error(attend(setup, fn, ctx=negative, tables=tables), "context_lens", "-1", f"0..{capacity}")


@pytest.mark.parametrize("fn", [cache_update_reference, cache_update])
def test_slot_beyond_the_cache(setup, fn):
    expect_error(update(setup, fn, slots=torch.tensor([0, N * B, 1])), "slot_mapping", f"slot {N * B}",
                 f"< num_blocks*block_size = {N * B}")


def test_model_and_cache_configuration_errors():
    expect_error(lambda: TQModelConfig(num_q_heads=6, num_kv_heads=4), "num_q_heads=6", "num_kv_heads=4")
    expect_error(lambda: TQModelConfig(block_size=0), "block_size=0", ">= 1")
    expect_error(lambda: allocate_cache(0, B, HKV, D, 2, 2), "num_blocks=0", ">= 1")
    expect_error(lambda: allocate_cache(N, B, 2.0, D, 2, 2), "num_kv_heads=2.0", "int >= 1")
    config = TQModelConfig(num_blocks=4, max_blocks_per_seq=2)
    expect_error(lambda: example_inputs(config, [0, 3]), "context_lens=[0, 3]", ">= 1")
    expect_error(lambda: example_inputs(config, [33]), "33", "<= max_blocks_per_seq*block_size = 32")
    expect_error(lambda: example_inputs(config, [32, 32, 1]), "need 5 blocks", "num_blocks=4")
    expect_error(lambda: make_rotation(D, "givens"), "kind='givens'", "'haar'")
    expect_error(lambda: make_rotation(48, "hadamard"), "dim=48", "power of two")
    expect_error(lambda: MixedPrecisionTurboQuant.preset(D, 2.0), "effective_bits=2.0", "2.5")
    expect_error(lambda: TurboQuantMSE(D, 2, distribution="uniform"), "distribution='uniform'", "'sphere'")


@pytest.mark.parametrize("seed", [1.7, -1, 2**70, True])
def test_seeds_are_ints_in_range_not_truncated(seed):
    """Issue 25: a float seed was truncated (1.7 -> the rotation of seed 1)."""
    expect_error(lambda: make_rotation(D, "haar", seed), f"seed={seed!r}", "expected an int in [0, 2**63)")
    expect_error(lambda: TurboQuantMSE(D, 2, seed=seed), f"seed={seed!r}")
    expect_error(lambda: TurboQuantProd(D, 1, seed=seed), f"seed={seed!r}")
    expect_error(lambda: TQModelConfig(seed=seed), f"seed={seed!r}")


def test_outlier_indices_are_integers():
    """Issue 25: float indices were truncated (1.7 -> channel 1)."""
    expect_error(lambda: MixedPrecisionTurboQuant(D, 2, 3, 2, outlier_idx=torch.tensor([0.0, 1.7])),
                 "outlier_idx has dtype torch.float32", "expected integer channel indices")
    expect_error(lambda: MixedPrecisionTurboQuant(D, 2, 3, 2, outlier_idx=[0.5, 3.0]), "outlier_idx has dtype")
    assert MixedPrecisionTurboQuant(D, 2, 3, 2, outlier_idx=[0, 3]).outlier_idx.tolist() == [0, 3]


def test_fp16_quantize_near_the_largest_half_saturates_instead_of_inf(gen):
    """Issue 25: quantize computes in float32 and returns x's dtype; a reconstruction past 65504 (the
    quantization error of a coordinate at the limit) is set to 65504, never inf."""
    x = torch.full((3, D), 65504.0, dtype=torch.float16)
    x[1] = -65504.0
    x[2] = (torch.randn(D, generator=gen) * 60000).clamp(-65504, 65504).half()
    for quantizer in (TurboQuantMSE(D, 4), TurboQuantProd(D, 3), MixedPrecisionTurboQuant(D, D // 2, 3, 2)):
        y = quantizer.quantize(x)
        assert y.dtype == torch.float16 and torch.isfinite(y).all(), type(quantizer).__name__
        # the same as the float32 computation, saturated: nothing else changes
        want = quantizer.quantize(x.float()).clamp(-65504, 65504)
        assert torch.allclose(y.float(), want, rtol=2e-3, atol=0), type(quantizer).__name__
    assert TurboQuantMSE(D, 4).quantize(x.float()).abs().max() > 65504  # the case is reached


@pytest.mark.parametrize("name", ["seq_len", "num_layers", "num_kv_heads"])
@pytest.mark.parametrize("value", [-5, 0, 2.5])
def test_memory_report_sizes(name, value):
    args = {"seq_len": 1024, "num_layers": 2, "num_kv_heads": 2, name: value}
    expect_error(lambda: TurboQuantMSE(D, 2).memory_report(**args), f"{name}={value!r}", "expected an int >= 1")


def test_decode_model_refuses_positions_and_context_lengths_that_would_be_silently_wrong():
    config = TQModelConfig(num_blocks=8, max_blocks_per_seq=4)
    model = TQDecodeModel(config)
    inputs = example_inputs(config, [3, 17, 1])

    def step(**changes):
        return lambda: model(**{**inputs, **changes})

    step()()  # the inputs as made are accepted
    expect_error(step(positions=inputs["positions"].float()), "positions.dtype=torch.float32", "int32 or torch.int64")
    expect_error(step(positions=inputs["positions"][:1]), "positions.shape=(1,)", "expected (3,)")
    expect_error(step(positions=inputs["positions"][:, None]), "positions.shape=(3, 1)", "expected (3,)")
    expect_error(step(context_lens=inputs["context_lens"][:1]), "context_lens.shape=(1,)")
    short = inputs["context_lens"].clone()
    short[1] -= 1  # the new token at position 16 outside a 16-token context
    expect_error(step(context_lens=short), "context_lens[1]=16 with positions[1]=16", "expected >= 17")
    expect_error(step(positions=inputs["positions"] - 5), "positions=", "expected every entry >= 0")
