"""The whole exported decode model in ONNX Runtime (CPU, our custom-op library) vs the PyTorch reference.

Fresh random inputs every run (seed printed on failure); GQA groups 1/4/8, D 64/128,
mixed bit widths, a context of one token, partial blocks, and batch/num_blocks/block-table
widths other than the ones seen at export (the dynamic axes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tq_deploy.reference.model import TQModelConfig, example_inputs
from tq_deploy.validate.compare import Tolerance, compare
from tq_deploy.validate.reference import bits_of_outputs, reference_outputs

ort = pytest.importorskip("onnxruntime")


CONFIGS = {
    # name: (config, group size Hq/Hkv)
    "gqa1-d64-k4v4": TQModelConfig(hidden_size=128, num_q_heads=4, num_kv_heads=4, head_dim=64, k_bits=4, v_bits=4,
                                   block_size=16, num_blocks=24, max_blocks_per_seq=8, seed=1),
    "gqa4-d128-k3v2": TQModelConfig(hidden_size=192, num_q_heads=8, num_kv_heads=2, head_dim=128, k_bits=3, v_bits=2,
                                    block_size=16, num_blocks=30, max_blocks_per_seq=6, seed=2, rotation="hadamard"),
    "gqa8-d64-k2v1-b8": TQModelConfig(hidden_size=64, num_q_heads=8, num_kv_heads=1, head_dim=64, k_bits=2, v_bits=1,
                                      block_size=8, num_blocks=40, max_blocks_per_seq=10, seed=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory, ort_library):
    from tq_deploy.export import export_model
    from tq_deploy.runtime.session import make_session

    config = CONFIGS[request.param]
    path = tmp_path_factory.mktemp("ort_model") / f"{request.param}.onnx"
    model = export_model(config, path)
    session = make_session(str(path), library=ort_library)
    return config, model, session


def aligned_reference(config: TQModelConfig, inputs: dict, actual: dict):
    """The reference decode step whose cache update takes ORT's codes after checking that each code that
    differs is a rounding tie (tq_deploy.validate.llm's aligned ops, as the LLM checks use): (outputs, ties)."""
    from tq_deploy.reference.model import ReferenceOps, decode_model, model_input_names, model_output_names
    from tq_deploy.validate.llm import CodeTies, _AlignedOps

    class Aligned(_AlignedOps):
        paged_attention = staticmethod(ReferenceOps.paged_attention)

    ties = CodeTies()
    ops = Aligned(0, {f"{k}.0": v for k, v in actual.items() if k.endswith("_out")}, ties)
    module = decode_model(config, ops).eval()
    feeds = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        values = module(*(feeds[n] for n in model_input_names(config)))
    return dict(zip(model_output_names(config), values)), ties


def assert_matches_reference(config, model, inputs, actual):
    """ORT's outputs equal the reference's; where a code differs, it must be a rounding tie (two float32
    computations of the same key may fall either side of a codebook boundary) and the attention output
    must equal the reference's over ORT's codes."""
    expected = reference_outputs(model, inputs)
    tolerance = Tolerance(atol=1e-4, rtol=1e-3, code_mismatch=0.0)
    report = compare(actual, expected, title="ORT vs reference", code_bits=bits_of_outputs(model), tolerance=tolerance)
    if report.passed:
        return expected
    assert config.num_layers == 1
    aligned, ties = aligned_reference(config, inputs, actual)
    assert ties.passed, report.to_text() + "\n" + ties.text()
    again = compare(actual, aligned, title="ORT vs reference on ORT's codes", code_bits=bits_of_outputs(model),
                    tolerance=tolerance)
    assert again.passed, report.to_text() + "\n" + ties.text() + "\n" + again.to_text()
    return aligned


def run_and_compare(exported, inputs):
    from tq_deploy.runtime.session import run

    config, model, session = exported
    actual = {k: torch.from_numpy(v) for k, v in run(session, inputs).items()}
    return actual, assert_matches_reference(config, model, inputs, actual)


def _context_cases(config: TQModelConfig, gen: torch.Generator) -> list[list[int]]:
    b = config.block_size
    capacity = config.max_blocks_per_seq * b
    fresh = [int(x) for x in torch.randint(1, capacity + 1, (3,), generator=gen)]
    return [
        [1],                               # a context of one token: the new one
        [b - 1, b, b + 1],                 # partial, exactly full, one past a block
        [1, 3 * b // 2, capacity],         # mixed batch up to the table's capacity
        fresh,                             # fresh random lengths
    ]


def test_matches_reference(exported, seed):
    config = exported[0]
    gen = torch.Generator().manual_seed(seed)
    for k, lens in enumerate(_context_cases(config, gen)):
        lens = [min(x, config.max_blocks_per_seq * config.block_size) for x in lens]
        run_and_compare(exported, example_inputs(config, lens, seed=seed + k))


def test_dynamic_axes_other_sizes(exported, seed):
    """Batch, num_blocks and block-table width unlike the export's, and junk in unused table entries."""
    config = exported[0]
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 9, (1,), generator=gen))
    wider = dataclasses.replace(config, max_blocks_per_seq=config.max_blocks_per_seq + 3,
                                num_blocks=(config.max_blocks_per_seq + 3) * batch + 5)
    capacity = wider.max_blocks_per_seq * wider.block_size
    lens = [int(x) for x in torch.randint(1, capacity + 1, (batch,), generator=gen)]
    inputs = example_inputs(wider, lens, seed=seed)
    # Entries past ceil(ctx / B) must never be read: fill them with out-of-range junk.
    used = -(-inputs["context_lens"].long() // wider.block_size)
    columns = torch.arange(inputs["block_tables"].shape[1])
    inputs["block_tables"][columns[None, :] >= used[:, None]] = 10**6
    actual, expected = run_and_compare(exported, inputs)
    assert actual["out"].shape == (batch, config.hidden_size)
    # The new tokens landed in their slots: the caches changed exactly there.
    slots = inputs["slot_mapping"]
    changed = (actual["k_norms_out"] != inputs["k_norms"]).reshape(-1, config.num_kv_heads).any(-1)
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(slots.tolist())
    assert changed[slots].all()


def test_cache_round_trip_two_steps(exported, seed):
    """Feed the updated caches of step 1 into step 2 (as a server would); both match the reference."""
    config = exported[0]
    b = config.block_size
    # Both sequences' next token falls in a block they already own (b + 3 <= 2b, 4 <= b).
    inputs = example_inputs(config, [b + 2, 3], seed=seed)
    actual, _ = run_and_compare(exported, inputs)
    step2 = dict(inputs)
    step2.update({name: actual[f"{name}_out"] for name in ("k_codes", "k_norms", "v_codes", "v_norms")})
    gen = torch.Generator().manual_seed(seed + 1)
    step2["hidden"] = torch.randn(inputs["hidden"].shape, generator=gen)
    step2["positions"] = inputs["positions"] + 1
    step2["context_lens"] = inputs["context_lens"] + 1
    tables = inputs["block_tables"]
    step2["slot_mapping"] = torch.stack([
        tables[s, int(p) // b].long() * b + int(p) % b for s, p in enumerate(step2["positions"])
    ])
    run_and_compare(exported, step2)


def test_io_binding_updates_the_cache_in_place(exported, seed):
    """With IO binding the caches are written into the caller's arrays (no copy), and still match."""
    from tq_deploy.runtime.session import run_in_place
    from tq_deploy.validate.inputs import as_numpy

    config, model, session = exported
    inputs = example_inputs(config, [2, config.block_size + 1], seed=seed)
    arrays = as_numpy(inputs)
    before = {n: arrays[n].copy() for n in ("k_codes", "k_norms", "v_codes", "v_norms")}
    buffers = {n: arrays[n].ctypes.data for n in before}
    outputs = run_in_place(session, arrays)
    assert_matches_reference(config, model, inputs, {k: torch.from_numpy(v.copy()) for k, v in outputs.items()})
    for name, address in buffers.items():
        assert outputs[f"{name}_out"].ctypes.data == address  # the same buffer...
        assert not np.array_equal(arrays[name], before[name])  # ...and it changed in place
