// GENERATED from tq_deploy/ops.py by `python -m tq_deploy.export.op_tables --native plugins/common`: do not edit.
// tests/test_export.py fails when it drifts from the specs.
//
// TQ_FOR_EACH_OP(X) expands X(stem, Pascal, float_types, norm_types) once per op of
// tq_deploy/ops.py: float_types is 2 where the op has a float type parameter T (a kernel each for
// float32 and float16), else 1; norm_types likewise for the cache norms' type TN. The kernels'
// declarations (tq_kernels.h, tq_cuda.h), the ONNX Runtime op table and factories
// (plugins/ort/register_ops.cc) and the TensorRT plugin classes and creators
// (plugins/trt/tq_plugins.h, tq_plugin_creators.cc) expand it.
#pragma once

#define TQ_FOR_EACH_OP(X) \
  X(encode, Encode, 2, 1) \
  X(decode, Decode, 1, 1) \
  X(cache_update, CacheUpdate, 2, 2) \
  X(paged_attention, PagedAttention, 2, 2) \
  X(paged_prefill, PagedPrefill, 2, 2) \

#define TQ_NUM_OPS 5
