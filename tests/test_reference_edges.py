"""Edges of the PyTorch reference's paged ops and quantizer that the main reference tests did not
pin (found by mutation testing, docs/reliability.md): many tokens naming one slot, a one-block
cache, zero vectors, the theory of the Gaussian codebook, and the argument each refusal names."""

from __future__ import annotations

import pytest
import torch

from tq_deploy.reference import lloyd_max_codebook, make_rotation
from tq_deploy.reference.paged import allocate_cache, cache_update_reference, paged_attention_reference
from tq_deploy.reference.codebook import expected_mse
from tq_deploy.reference.quantizer import TurboQuantMSE, decode_reference, encode_reference, random_unit_vectors


def test_many_tokens_per_slot_keep_the_last(gen):
    """200 tokens over 7 slots: each slot holds the encoding of the last token that names it. (Past
    16 elements an unstable sort of the slots reorders equal ones, so the order must be kept.)"""
    dim, hkv, b, bits = 32, 1, 4, 3
    rot, cb = make_rotation(dim, seed=1), lloyd_max_codebook(dim, bits)
    cache = allocate_cache(2, b, hkv, dim, bits, bits)
    slots = torch.randint(0, 7, (200,), generator=gen)
    slots[-7:] = torch.randperm(7, generator=gen)  # every slot written, the last writers known
    key, value = torch.randn(200, hkv, dim, generator=gen), torch.randn(200, hkv, dim, generator=gen)
    cache_update_reference(key, value, slots, *cache.tensors(), rot, cb, cb, bits, bits)
    last = {int(s): i for i, s in enumerate(slots)}
    assert set(last.values()) == set(range(193, 200))
    for slot, i in last.items():
        codes, norms = encode_reference(key[i], rot, cb, bits)
        assert torch.equal(cache.k_codes[slot // b, slot % b], codes) and torch.equal(cache.k_norms[slot // b, slot % b], norms)
        codes, norms = encode_reference(value[i], rot, cb, bits)
        assert torch.equal(cache.v_codes[slot // b, slot % b], codes)


def test_a_one_block_cache_and_a_shorter_sequence(gen):
    """Positions past a sequence's context look up no block: with one block in the cache, sequence 1
    (2 tokens, beside one of 5) gives what it gives alone."""
    dim, hkv, b, bits = 32, 2, 8, 2
    rot, cb = make_rotation(dim, seed=2), lloyd_max_codebook(dim, bits)
    cache = allocate_cache(1, b, hkv, dim, bits, bits)
    cache_update_reference(torch.randn(5, hkv, dim, generator=gen), torch.randn(5, hkv, dim, generator=gen),
                           torch.arange(5), *cache.tensors(), rot, cb, cb, bits, bits)
    query = torch.randn(2, 4, dim, generator=gen)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    both = paged_attention_reference(query, *cache.tensors(), tables, torch.tensor([5, 2], dtype=torch.int32), rot,
                                     cb, cb, bits, bits)
    alone = paged_attention_reference(query[1:], *cache.tensors(), tables[1:], torch.tensor([2], dtype=torch.int32),
                                      rot, cb, cb, bits, bits)
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)


@pytest.mark.parametrize("k_bits,v_bits,name", [(9, 3, "k_bits"), (3, 0, "v_bits")])
def test_allocate_cache_names_the_bad_bit_width(k_bits, v_bits, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        allocate_cache(2, 4, 1, 32, k_bits, v_bits)


def test_zero_vectors_encode_to_norm_zero_and_decode_to_zeros():
    dim, bits = 32, 3
    rot, cb = make_rotation(dim, seed=3), lloyd_max_codebook(dim, bits)
    x = torch.zeros(3, dim)
    x[1, 4] = 2.0
    codes, norms = encode_reference(x, rot, cb, bits)
    assert norms.tolist() == [0.0, 2.0, 0.0]
    # a zero vector's coordinates are all 0: each takes the code of 0 (ties take the lower code)
    from tq_deploy.reference.packing import unpack_codes

    zero_code = int(((cb[1:] + cb[:-1]) / 2 < 0).sum())
    assert (unpack_codes(codes[[0, 2]], bits, dim) == zero_code).all()
    out = decode_reference(codes, norms, rot, cb, bits)
    assert torch.isfinite(out).all() and (out[0] == 0).all() and (out[2] == 0).all()


def test_validate_reports_the_theory_of_its_own_distribution():
    q = TurboQuantMSE(64, 2, distribution="gaussian")
    theory = q.validate(num_vectors=500)["theory"]
    assert theory == expected_mse(64, 2, "gaussian") and theory != expected_mse(64, 2, "sphere")


def test_quantizer_refusals_name_the_argument():
    with pytest.raises(ValueError, match=r"^seed="):
        random_unit_vectors(3, 8, seed=-1)
    with pytest.raises((ValueError, TypeError), match=r"^x\.dtype=torch.int32"):
        TurboQuantMSE(32, 2).quantize(torch.zeros(3, 32, dtype=torch.int32))


def test_quantizer_messages_name_the_argument_and_the_value_seen():
    from tq_deploy.reference.quantizer import MixedPrecisionTurboQuant, TurboQuantProd

    with pytest.raises(ValueError, match=r"^bits=9"):
        TurboQuantMSE(32, 9)
    with pytest.raises(ValueError, match=r"^x\.shape\[-1\]=31, expected head_dim=32$"):
        TurboQuantMSE(32, 2).quantize(torch.zeros(3, 31))
    with pytest.raises(ValueError, match=r"^num_layers=0, expected an int >= 1$"):
        TurboQuantMSE(32, 2).memory_report(seq_len=4, num_layers=0, num_kv_heads=2)
    mixed = MixedPrecisionTurboQuant(32, 8, 3, 2)
    with pytest.raises(ValueError, match=r"^x\.shape\[-1\]=31, expected head_dim=32$"):
        mixed.quantize(torch.zeros(3, 31))
    for call in (TurboQuantProd(32, 3).encode, mixed.quantize):
        with pytest.raises(ValueError, match=r"^x\.dtype=torch\.int32"):
            call(torch.zeros(3, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^outlier_idx=\[0, 1, 2, 3, 4, 5, 6, 32\]"):
        MixedPrecisionTurboQuant(32, 8, 3, 2, outlier_idx=[0, 1, 2, 3, 4, 5, 6, 32])


def test_prod_decode_returns_the_dtype_asked(gen):
    from tq_deploy.reference.quantizer import TurboQuantProd

    q = TurboQuantProd(32, 3)
    codes = q.encode(torch.randn(4, 32, generator=gen))
    assert q.decode(codes, torch.float16).dtype == torch.float16 and q.decode(codes).dtype == torch.float32


def test_mixed_presets_take_every_documented_width_and_the_rotation():
    from tq_deploy.reference.quantizer import MixedPrecisionTurboQuant

    for bits in (1.5, 2.5, 3.5):
        assert MixedPrecisionTurboQuant.preset(64, bits).effective_bits == bits
    q = MixedPrecisionTurboQuant.preset(64, 2.5, seed=4, rotation="hadamard")
    assert torch.equal(q.outlier.rotation, make_rotation(32, "hadamard", 4))
    assert torch.equal(q.regular.rotation, make_rotation(32, "hadamard", 5))


@pytest.mark.parametrize("field,args", [("num_blocks", (0, 4, 1)), ("block_size", (2, 0, 1)),
                                        ("num_kv_heads", (2, 4, -1))])
def test_allocate_cache_refuses_empty_sizes(field, args):
    with pytest.raises(ValueError, match=rf"^{field}=-?[01], expected an int >= 1$"):
        allocate_cache(*args, 32, 2, 2)
