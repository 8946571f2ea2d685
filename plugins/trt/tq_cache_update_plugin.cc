// TQCacheUpdate as a TensorRT IPluginV3 (tq_deploy/ops.py: CACHE_UPDATE) over tq_cuda_cache_update;
// the cache outputs alias their inputs (in place) where TensorRT honours getAliasedInput, else
// start as a copy (TQPlugin::enqueue).
#include "tq_plugin_shapes.h"
#include "tq_plugins.h"

namespace tq_trt {

namespace op = tq_ops::cache_update;

// ---- TQCacheUpdate: key, value [T, Hkv, D], slot_mapping [T], caches, rotation, codebooks -> caches
bool CacheUpdatePlugin::output_shapes(const DimsExprs* in, DimsExprs* out, IExprBuilder&) const {
  for (int32_t o = 0; o < op::kNumOutputs; ++o) out[o] = in[def_.aliased_input[o]];
  return true;
}

std::string CacheUpdatePlugin::check_shapes(const Dims* in, int32_t) const {
  const int k_bits = attrs_.get_int(op::kKBits), v_bits = attrs_.get_int(op::kVBits);
  const Dims &key = in[op::kKey], &value = in[op::kValue], &slots = in[op::kSlotMapping];
  const Dims &k_codes = in[op::kKCodes], &rotation = in[op::kRotation];
  std::string problem = first_problem({expect_rank("key", key, 3), expect_rank("value", value, 3),
                                       expect_rank("slot_mapping", slots, 1)});
  if (!problem.empty()) return problem;
  const int64_t dim = known({key.d[2], value.d[2], rotation.d[0]});
  const int64_t hkv = known({key.d[1], value.d[1], k_codes.nbDims == 4 ? k_codes.d[2] : -1});
  return first_problem({expect_dim("value", value, 0, key.d[0], "num_tokens of key"),
                        expect_dim("value", value, 1, hkv, "num_kv_heads"),
                        expect_dim("key", key, 1, hkv, "num_kv_heads"),
                        expect_dim("value", value, 2, dim, "head_dim"), expect_dim("key", key, 2, dim, "head_dim"),
                        expect_dim("slot_mapping", slots, 0, key.d[0], "num_tokens of key"),
                        check_cache(k_codes, in[op::kKNorms], k_codes, hkv, dim, k_bits, "k"),
                        check_cache(in[op::kVCodes], in[op::kVNorms], k_codes, hkv, dim, v_bits, "v"),
                        check_rotation_codebook(rotation, dim, in[op::kKCodebook], "k_codebook", k_bits),
                        check_rotation_codebook(rotation, dim, in[op::kVCodebook], "v_codebook", v_bits)});
}

}  // namespace tq_trt
