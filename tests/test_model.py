"""The reference decode model (issue item 8), checked against an independent computation:
projections by hand, a complex-number RoPE, the cache decoded slot by slot, torch SDPA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tq_deploy.reference.model import TQDecodeModel, TQModelConfig, example_inputs
from tq_deploy.reference.packing import unpack_codes
from tq_deploy.reference.quantizer import encode_reference

CONFIGS = {
    "default": (TQModelConfig(), [1, 15, 17, 40]),
    "gqa8-d128-b32": (TQModelConfig(hidden_size=192, num_q_heads=8, num_kv_heads=1, head_dim=128, k_bits=3,
                                    v_bits=2, block_size=32, num_blocks=24, max_blocks_per_seq=12, seed=3),
                      [1, 31, 33, 300]),
    "gqa1-hadamard": (TQModelConfig(hidden_size=128, num_q_heads=4, num_kv_heads=4, head_dim=64, k_bits=1,
                                    v_bits=4, block_size=16, num_blocks=20, max_blocks_per_seq=8, seed=5,
                                    rotation="hadamard"), [16, 17, 2]),
}

NAMES = ("hidden", "positions", "slot_mapping", "block_tables", "context_lens", "k_codes", "k_norms", "v_codes",
         "v_norms")


def run(model, inputs):
    """Forward on a deep copy: the caches are updated in place."""
    fresh = copy.deepcopy(inputs)
    with torch.no_grad():
        return model(*(fresh[n] for n in NAMES))


def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE written as complex multiplication: pair (x_i, x_{i + D/2}) is the complex
    number x_i + 1j x_{i+D/2}, turned by angle pos * theta^(-2i/D). x [S, H, D] float64."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    turn = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions.double()[:, None] * freq)
    z = torch.complex(x[..., :half], x[..., half:]) * turn[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


@torch.no_grad()
def independent_qkv(model, inputs):
    c = model.config
    h = inputs["hidden"].double() @ model.qkv_proj.weight.double().T
    s = h.shape[0]
    q, k, v = h.split([c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
    q = rope_complex(q.reshape(s, c.num_q_heads, c.head_dim), inputs["positions"], c.rope_theta)
    k = rope_complex(k.reshape(s, c.num_kv_heads, c.head_dim), inputs["positions"], c.rope_theta)
    return q, k, v.reshape(s, c.num_kv_heads, c.head_dim)


def decode_slot(codes, norms, codebook, bits, rotation):
    dim = rotation.shape[0]
    return norms.double().unsqueeze(-1) * (codebook.double()[unpack_codes(codes, bits, dim).long()] @ rotation.double())


@torch.no_grad()
def independent_output(model, inputs, caches) -> torch.Tensor:
    c = model.config
    k_codes, k_norms, v_codes, v_norms = caches
    q, _, _ = independent_qkv(model, inputs)
    b = c.block_size
    outs = []
    for s in range(q.shape[0]):
        ctx = int(inputs["context_lens"][s])
        blocks = [int(inputs["block_tables"][s, t // b]) for t in range(ctx)]
        k = torch.stack([decode_slot(k_codes[blk, t % b], k_norms[blk, t % b], model.k_codebook, c.k_bits,
                                     model.rotation) for t, blk in enumerate(blocks)], 1)  # [Hkv, L, D]
        v = torch.stack([decode_slot(v_codes[blk, t % b], v_norms[blk, t % b], model.v_codebook, c.v_bits,
                                     model.rotation) for t, blk in enumerate(blocks)], 1)
        group = c.num_q_heads // c.num_kv_heads
        a = F.scaled_dot_product_attention(q[s].unsqueeze(1), k.repeat_interleave(group, 0),
                                           v.repeat_interleave(group, 0)).squeeze(1)  # [Hq, D]
        outs.append(a.reshape(-1) @ model.o_proj.weight.double().T)
    return torch.stack(outs)


@pytest.mark.parametrize("name", CONFIGS)
def test_output_matches_independent_computation(name, seed):
    config, ctx = CONFIGS[name]
    model = TQDecodeModel(config).eval()
    inputs = example_inputs(config, ctx, seed=seed)
    out, *caches = run(model, inputs)
    assert out.shape == (len(ctx), config.hidden_size) and out.dtype == torch.float32
    expected = independent_output(model, inputs, caches)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name", CONFIGS)
def test_new_token_is_written_at_its_slot_and_nothing_else_changes(name, seed):
    config, ctx = CONFIGS[name]
    model = TQDecodeModel(config)
    inputs = example_inputs(config, ctx, seed=seed)
    _, *caches = run(model, inputs)
    q_mine, k_mine, v_mine = independent_qkv(model, inputs)
    with torch.no_grad():
        q_model, k_model, v_model = model.project_qkv(inputs["hidden"], inputs["positions"])
    # float32 RoPE angles pos * freq lose ~1e-7 * pos radians: a few 1e-5 at position 300.
    for mine, theirs in ((q_mine, q_model), (k_mine, k_model), (v_mine, v_model)):
        torch.testing.assert_close(theirs.double(), mine, rtol=1e-4, atol=1e-4)
    b, n = config.block_size, config.num_blocks
    k_codes, k_norms, v_codes, v_norms = caches
    slots = inputs["slot_mapping"].tolist()
    # The slot of token ctx - 1 of each sequence, from the block table.
    assert slots == [int(inputs["block_tables"][s, (c - 1) // b]) * b + (c - 1) % b for s, c in enumerate(ctx)]
    kc, kn = encode_reference(k_model, model.rotation, model.k_codebook, config.k_bits)
    vc, vn = encode_reference(v_model, model.rotation, model.v_codebook, config.v_bits)
    for s, slot in enumerate(slots):
        blk, off = divmod(slot, b)
        assert torch.equal(k_codes[blk, off], kc[s]) and torch.equal(v_codes[blk, off], vc[s])
        assert torch.equal(k_norms[blk, off], kn[s]) and torch.equal(v_norms[blk, off], vn[s])
        decoded = decode_slot(k_codes[blk, off], k_norms[blk, off], model.k_codebook, config.k_bits, model.rotation)
        rel = (decoded - k_mine[s]).pow(2).sum(-1) / k_mine[s].pow(2).sum(-1)
        assert float(rel.max()) < 1.0  # a quantized copy of the new key, not some other vector
    untouched = torch.ones(n * b, dtype=torch.bool)
    untouched[slots] = False
    for name_, now in zip(NAMES[5:], caches):
        before = inputs[name_].reshape(n * b, -1)
        assert torch.equal(now.reshape(n * b, -1)[untouched], before[untouched]), name_


def test_example_inputs_hold_the_prior_tokens(seed):
    config = TQModelConfig(num_blocks=16, max_blocks_per_seq=6)
    ctx = [1, 16, 17, 50]
    inputs = example_inputs(config, ctx, seed=seed)
    b = config.block_size
    assert inputs["positions"].tolist() == [c - 1 for c in ctx]
    assert inputs["context_lens"].dtype == torch.int32 and inputs["block_tables"].dtype == torch.int32
    assert inputs["slot_mapping"].dtype == torch.int64 and inputs["block_tables"].shape == (4, 6)
    norms = inputs["k_norms"]
    used_blocks = set()
    for s, c in enumerate(ctx):
        blocks = inputs["block_tables"][s, : math.ceil(c / b)].tolist()
        assert not used_blocks & set(blocks)  # no block shared between sequences
        used_blocks |= set(blocks)
        for t in range(c - 1):
            assert bool((norms[blocks[t // b], t % b] > 0).all())
        last = c - 1
        assert bool((norms[blocks[last // b], last % b] == 0).all())  # the new token's slot is still empty
    assert int(norms.count_nonzero()) == sum(c - 1 for c in ctx) * config.num_kv_heads


def test_deterministic_from_seed(seed):
    config = TQModelConfig(seed=seed % 1000)
    a, b = TQDecodeModel(config), TQDecodeModel(config)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    inputs = example_inputs(config, [5, 20], seed=seed)
    out_a, out_b = run(a, inputs), run(b, inputs)
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
    other = TQDecodeModel(TQModelConfig(seed=seed % 1000 + 1))
    assert not torch.equal(other.qkv_proj.weight, a.qkv_proj.weight)
    assert not torch.equal(other.rotation, a.rotation)
    assert not torch.allclose(run(other, inputs)[0], out_a[0])
    # example_inputs is a function of its seed too.
    again = example_inputs(config, [5, 20], seed=seed)
    assert all(torch.equal(inputs[n], again[n]) for n in NAMES)


def test_config_round_trips_through_a_dict():
    config = CONFIGS["gqa8-d128-b32"][0]
    assert TQModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.gpu
def test_model_runs_on_cuda_like_on_cpu(seed):
    from tq_deploy.dispatch import force_reference

    config, ctx = CONFIGS["default"]
    model = TQDecodeModel(config)
    inputs = example_inputs(config, ctx, seed=seed)
    cpu_out = run(model, inputs)[0]
    cuda_inputs = {n: t.cuda() for n, t in inputs.items()}
    with force_reference():
        out = run(model.cuda(), cuda_inputs)[0]
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-3, atol=1e-3 * float(cpu_out.abs().max()))
