// TQCacheUpdate as a TensorRT IPluginV3 (tq_deploy/ops.py: CACHE_UPDATE) over tq_cuda_cache_update;
// the cache outputs alias their inputs (in place) where TensorRT honours getAliasedInput.
#include "tq_cuda.h"
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IExprBuilder;

const OpDef kCacheUpdateDef = op_def(tq_ops::cache_update::kOp);

// ---- TQCacheUpdate: key, value [T, Hkv, D], slot_mapping [T], caches, rotation, codebooks -> caches
bool CacheUpdatePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  for (int32_t o = 0; o < 4; ++o) out[o] = in[3 + o];
  return true;
}

std::string CacheUpdatePlugin::check_shapes(const Dims* in) const {
  const int k_bits = attrs_.get_int(0), v_bits = attrs_.get_int(1);
  const Dims &key = in[0], &value = in[1], &slots = in[2];
  std::string problem = first_problem({expect_rank("key", key, 3), expect_rank("value", value, 3),
                                       expect_rank("slot_mapping", slots, 1)});
  if (!problem.empty()) return problem;
  const int64_t dim = known({key.d[2], value.d[2], in[7].d[0]});
  const int64_t hkv = known({key.d[1], value.d[1], in[3].nbDims == 4 ? in[3].d[2] : -1});
  return first_problem({expect_dim("value", value, 0, key.d[0], "num_tokens of key"),
                        expect_dim("value", value, 1, hkv, "num_kv_heads"),
                        expect_dim("key", key, 1, hkv, "num_kv_heads"),
                        expect_dim("value", value, 2, dim, "head_dim"), expect_dim("key", key, 2, dim, "head_dim"),
                        expect_dim("slot_mapping", slots, 0, key.d[0], "num_tokens of key"),
                        check_cache(in[3], in[4], in[3], hkv, dim, k_bits, "k"),
                        check_cache(in[5], in[6], in[3], hkv, dim, v_bits, "v"),
                        check_rotation_codebook(in[7], dim, in[8], "k_codebook", k_bits),
                        check_rotation_codebook(in[7], dim, in[9], "v_codebook", v_bits)});
}

size_t CacheUpdatePlugin::workspace_bytes(const nvinfer1::DynamicPluginTensorDesc* in) const {
  return tq_cuda_cache_update_workspace(in[0].max.d[0]);  // key [T, Hkv, D]
}

int CacheUpdatePlugin::run(const nvinfer1::PluginTensorDesc* d, const void* const* in, void* const* out,
                           void* workspace, cudaStream_t stream) {
  // Outputs alias inputs 3..6 when TensorRT honours getAliasedInput; otherwise start from a copy.
  for (int o = 0; o < 4; ++o) {
    if (out[o] == in[3 + o]) continue;
    const size_t bytes = static_cast<size_t>(volume(d[3 + o].dims) * element_size(d[3 + o].type));
    if (cudaError_t rc = cudaMemcpyAsync(out[o], in[3 + o], bytes, cudaMemcpyDeviceToDevice, stream))
      return static_cast<int>(rc);
  }
  const Dims& key = d[0].dims;
  const Dims& k_codes = d[3].dims;
  return tq_cuda_cache_update(in[0], in[1], float_type(d[0].type), static_cast<const int64_t*>(in[2]), key.d[0],
                              key.d[1], key.d[2], static_cast<uint8_t*>(out[0]), static_cast<float*>(out[1]),
                              static_cast<uint8_t*>(out[2]), static_cast<float*>(out[3]), k_codes.d[0], k_codes.d[1],
                              static_cast<const float*>(in[7]), static_cast<const float*>(in[8]),
                              static_cast<const float*>(in[9]), attrs_.get_int(0), attrs_.get_int(1), workspace,
                              tq_cuda_cache_update_workspace(key.d[0]), stream);
}

}  // namespace tq_trt
