"""The GPU benchmarks' inputs, checked on the CPU: the shapes `bench gpu` times are what their labels
say, and the fp16 decode step `bench ort-cuda` times is the exported step with fp16 TurboQuant nodes."""

import numpy as np
import pytest
import torch

from tq_deploy.bench.gpu import OTHER_SHAPES
from tq_deploy.presets import PRESETS


def test_other_shapes_carry_typed_options():
    for shape in OTHER_SHAPES:
        assert isinstance(shape.key_mean, bool), shape
        assert shape.norm_dtype in (torch.float32, torch.float16), shape
        assert ("key mean" in shape.label) == shape.key_mean, shape
        assert ("float16 norms" in shape.label) == (shape.norm_dtype == torch.float16), shape


def test_the_compact_row_is_the_compact_preset():
    compact = PRESETS["compact"]
    (row,) = [s for s in OTHER_SHAPES if "(compact)" in s.label]
    assert (row.k_bits, row.v_bits) == (compact.k_bits, compact.v_bits)
    assert row.key_mean == (compact.key_mean is not None)
    assert str(row.norm_dtype).removeprefix("torch.") == compact.norm_dtype


def _small_layer():
    from tq_deploy.export import export_model
    from tq_deploy.reference.model import TQModelConfig

    config = TQModelConfig(hidden_size=64, num_q_heads=4, num_kv_heads=2, head_dim=32, k_bits=4, v_bits=3,
                           block_size=4, num_blocks=8, max_blocks_per_seq=4)
    return export_model(config), config


def _step(model, config):
    from tq_deploy.bench.ort_cuda import random_step

    step, feeds = random_step(model, config, batch=2, seq=11, provider="cpu", seed=3)
    return np.asarray(step.run(*feeds))


def test_fp16_attention_step_is_the_exported_step_in_half_precision(ort_library):
    import onnx

    from tq_deploy.bench.ort_cuda import fp16_attention

    full_model, config = _small_layer()
    half = fp16_attention(full_model)
    onnx.checker.check_model(half)
    tq_nodes = [n for n in half.graph.node if n.domain == "turboquant"]
    producers = {out: n for n in half.graph.node for out in n.output}
    for node in tq_nodes:
        fed = node.input[:2] if node.op_type == "TQCacheUpdate" else node.input[:1]
        for name in fed:
            cast = producers[name]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT16, (node.op_type, name)
    (attention,) = [n for n in tq_nodes if n.op_type == "TQPagedAttention"]
    (reader,) = [n for n in half.graph.node if attention.output[0] in n.input]
    assert reader.op_type == "Cast" and reader.attribute[0].i == onnx.TensorProto.FLOAT

    full = _step(full_model, config)
    halved = _step(half, config)
    assert halved.dtype == np.float32 and halved.shape == full.shape
    # fp16 keys may take a neighbouring code now and then: close to the float32 step, not equal to it
    assert np.abs(halved - full).max() <= 2e-2 * np.abs(full).max()
    assert not np.array_equal(halved, full)


@pytest.mark.parametrize("bad", ["bfloat16", "float64"])
def test_fp16_attention_is_the_only_other_dtype(bad):
    from tq_deploy.bench import ort_cuda

    with pytest.raises(ValueError, match=f"attention_dtype='{bad}'"):
        ort_cuda.exported_layer.__wrapped__(4, bad)
