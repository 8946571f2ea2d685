"""The TensorRT plugin objects without TensorRT and without a GPU.

libtq_trt_harness drives a plugin like TensorRT does (creator -> createPlugin(build) ->
getOutputDataTypes / supportsFormatCombination / configurePlugin -> serialized fields ->
createPlugin(runtime) -> attachToContext -> onShapeChange) and stops before enqueue
(dry_run=True), so attribute parsing, dtype rules and shape checks are tested here on CPU
tensors (their pointers are never read). tests/test_trt_enqueue_gpu.py runs enqueue on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tq_deploy import ops
from tq_deploy.runtime import tensorrt as rt
from tq_deploy.runtime.trt_harness import harness_enqueue


@pytest.fixture(scope="module", autouse=True)
def _libraries(trt_libraries):
    """Every test here drives the plugin through the harness: skip the module without them."""


def attention_tensors(s=3, hq=8, hkv=2, dim=64, k_bits=3, v_bits=2, n=5, b=16, m=4, dtype=torch.float32):
    inputs = [torch.zeros(s, hq, dim, dtype=dtype),
              torch.zeros(n, b, hkv, ops.packed_size(dim, k_bits), dtype=torch.uint8), torch.zeros(n, b, hkv),
              torch.zeros(n, b, hkv, ops.packed_size(dim, v_bits), dtype=torch.uint8), torch.zeros(n, b, hkv),
              torch.zeros(s, m, dtype=torch.int32), torch.zeros(s, dtype=torch.int32), torch.zeros(dim, dim),
              torch.zeros(2 ** k_bits), torch.zeros(2 ** v_bits)]
    return inputs, [torch.zeros(s, hq, dim, dtype=dtype)]


def dry(op, attrs, inputs, outputs):
    harness_enqueue(op, attrs, inputs, outputs, dry_run=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_valid_attention_passes_every_build_and_runtime_check(dtype):
    inputs, outputs = attention_tensors(dtype=dtype)
    dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2, "scale": 0.5}, inputs, outputs)
    dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs, outputs)  # scale is optional


def test_output_dtype_follows_the_query():
    inputs, _ = attention_tensors(dtype=torch.float16)
    with pytest.raises(RuntimeError, match="getOutputDataTypes: output 0 has type 1, expected 0"):
        dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs, [torch.zeros(3, 8, 64)])


@pytest.mark.parametrize("attrs,match", [
    ({"k_bits": 3}, "createPlugin"),                               # v_bits missing
    ({"k_bits": 3, "v_bits": 0}, "createPlugin"),
    ({"k_bits": 9, "v_bits": 2}, "createPlugin"),
    ({"k_bits": 3, "v_bits": 2, "scale": -1.0}, "createPlugin"),
    ({"k_bits": 4, "v_bits": 2}, "configurePlugin rejected"),       # k_codes rows are 3-bit sized
])
def test_bad_attributes_are_refused(attrs, match):
    inputs, outputs = attention_tensors()
    with pytest.raises(RuntimeError, match=match):
        dry("TQPagedAttention", attrs, inputs, outputs)


@pytest.mark.parametrize("index,shape", [
    (0, (3, 7, 64)),        # Hq not a multiple of Hkv
    (2, (5, 16, 3)),        # k_norms heads differ from k_codes
    (3, (5, 8, 2, 16)),     # v_codes block size differs
    (5, (4, 4)),            # block_tables rows != S
    (7, (64, 32)),          # rotation not [D, D]
    (8, (4,)),              # k_codebook not 2**k_bits
])
def test_inconsistent_shapes_are_refused(index, shape):
    inputs, outputs = attention_tensors()
    inputs[index] = torch.zeros(shape, dtype=inputs[index].dtype)
    if index == 0:
        outputs = [torch.zeros(shape)]
    with pytest.raises(RuntimeError, match="rejected the shapes"):
        dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs, outputs)


def test_mixed_float_types_are_refused():
    key = torch.zeros(4, 2, 32)
    value = torch.zeros(4, 2, 32, dtype=torch.float16)
    caches = [torch.zeros(3, 8, 2, 12, dtype=torch.uint8), torch.zeros(3, 8, 2),
              torch.zeros(3, 8, 2, 4, dtype=torch.uint8), torch.zeros(3, 8, 2)]
    books = [torch.zeros(32, 32), torch.zeros(8), torch.zeros(2)]
    inputs = [key, value, torch.zeros(4, dtype=torch.int64), *caches, *books]
    with pytest.raises(RuntimeError, match="supportsFormatCombination rejects position 1"):
        dry("TQCacheUpdate", {"k_bits": 3, "v_bits": 1}, inputs, [c.clone() for c in caches])
    inputs[1] = value.float()
    dry("TQCacheUpdate", {"k_bits": 3, "v_bits": 1}, inputs, [c.clone() for c in caches])


def test_codec_checks():
    dim, bits = 40, 3
    x, rot, book = torch.zeros(6, 5, dim), torch.zeros(dim, dim), torch.zeros(8)
    codes = torch.zeros(6, 5, ops.packed_size(dim, bits), dtype=torch.uint8)
    dry("TQEncode", {"bits": bits}, [x, rot, book], [codes, torch.zeros(6, 5)])
    dry("TQDecode", {"bits": bits}, [codes, torch.zeros(6, 5), rot, book], [x])
    with pytest.raises(RuntimeError, match="rejected the shapes"):  # codes rows sized for 4 bits
        dry("TQDecode", {"bits": bits}, [torch.zeros(6, 5, 20, dtype=torch.uint8), torch.zeros(6, 5), rot, book], [x])
    with pytest.raises(RuntimeError, match="rejected the shapes"):  # norms' leading dims differ
        dry("TQDecode", {"bits": bits}, [codes, torch.zeros(6, 4), rot, book], [x])


def test_attention_takes_the_optional_key_mean():
    inputs, outputs = attention_tensors()
    mean = [torch.zeros(2, 64), torch.zeros(32)]  # key_mean [Hkv, D], rope_inv_freq [D/2]
    dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs + mean, outputs)


@pytest.mark.parametrize("mean,match", [
    ([torch.zeros(2, 64)], "expected both or neither"),
    ([torch.zeros(3, 64), torch.zeros(32)], "key_mean.shape.0.=3, expected 2"),
    ([torch.zeros(2, 32), torch.zeros(32)], "key_mean.shape.1.=32, expected 64"),
    ([torch.zeros(2, 64), torch.zeros(64)], "rope_inv_freq.shape.0.=64, expected 32"),
    ([torch.zeros(2, 64), torch.zeros(2, 32)], "rope_inv_freq has rank 2"),
])
def test_bad_key_mean_shapes_are_refused(mean, match, capfd):
    inputs, outputs = attention_tensors()
    with pytest.raises(RuntimeError, match="rejected the shapes|configurePlugin"):
        dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs + mean, outputs)
    assert __import__("re").search(match, capfd.readouterr().err)


def test_float16_norms_are_one_type_per_node():
    """The cache norms are their own type parameter TN: float16 beside float32 queries passes, and an
    output's norm type follows the norm inputs; k_norms and v_norms of different types are refused."""
    inputs, outputs = attention_tensors()
    inputs[2], inputs[4] = inputs[2].half(), inputs[4].half()
    dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs, outputs)
    inputs[4] = inputs[4].float()
    with pytest.raises(RuntimeError, match="supportsFormatCombination rejects position 4"):
        dry("TQPagedAttention", {"k_bits": 3, "v_bits": 2}, inputs, outputs)
    key, value = torch.zeros(4, 2, 32, dtype=torch.float16), torch.zeros(4, 2, 32, dtype=torch.float16)
    caches = [torch.zeros(3, 8, 2, 12, dtype=torch.uint8), torch.zeros(3, 8, 2, dtype=torch.float16),
              torch.zeros(3, 8, 2, 4, dtype=torch.uint8), torch.zeros(3, 8, 2, dtype=torch.float16)]
    books = [torch.zeros(32, 32), torch.zeros(8), torch.zeros(2)]
    update = [key, value, torch.zeros(4, dtype=torch.int64), *caches, *books]
    dry("TQCacheUpdate", {"k_bits": 3, "v_bits": 1}, update, [c.clone() for c in caches])
    with pytest.raises(RuntimeError, match="getOutputDataTypes: output 1 has type 1, expected 0"):
        dry("TQCacheUpdate", {"k_bits": 3, "v_bits": 1}, update, [c.float() if c.dtype == torch.float16 else c.clone()
                                                                   for c in caches])
