// Launcher<Call>: one node's launches of its op (the ONNX Runtime CUDA kernels, the TensorRT
// plugins), generic over the ops: workspace(call) sizes the device scratch of a call, run(call)
// launches it. The paged attention's launcher keeps a plan per shape: a call whose sizes,
// attributes, dtypes and codes' and norms' alignment match the last one's reuses its plan, so a
// decode loop plans once (tq_cuda_paged_attention_plan: checks, split choice, SM-count query) and
// then only runs.
#pragma once

#include <stdint.h>

#include <mutex>

#include "tq_cuda.h"
#include "tq_paged_attention_plan.h"

namespace tq_cuda {

class AttentionPlans {
 public:
  // The plan of `call` (tokens_per_split 0), made on a miss; TQ_CUDA_BAD_ARGUMENT where planning refuses it.
  int get(const tq_paged_attention_call& call, tq_cuda_paged_attention_plan_t* plan) {
    const Key key = key_of(call);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!(valid_ && same(key, key_) && aligned(call) == aligned_)) {
      valid_ = false;
      if (int rc = tq_cuda_paged_attention_plan(&call, 0, &plan_)) return rc;
      key_ = key;
      aligned_ = aligned(call);
      valid_ = true;
    }
    *plan = plan_;
    return 0;
  }

 private:
  struct Key {
    int64_t sizes[7];
    int32_t k_bits, v_bits, dtype, norm_dtype;
    float scale;
  };
  static Key key_of(const tq_paged_attention_call& c) {
    return Key{{c.num_seqs, c.num_q_heads, c.head_dim, c.num_blocks, c.block_size, c.num_kv_heads, c.max_blocks},
               c.k_bits, c.v_bits, c.dtype, c.norm_dtype, c.scale};
  }
  // norm_dtype: the plan does not depend on it, but planning is where it is checked
  static bool same(const Key& a, const Key& b) {
    for (int i = 0; i < 7; ++i)
      if (a.sizes[i] != b.sizes[i]) return false;
    return a.k_bits == b.k_bits && a.v_bits == b.v_bits && a.dtype == b.dtype && a.norm_dtype == b.norm_dtype &&
           a.scale == b.scale;
  }
  // as tq_cuda_paged_attention_plan asks it, at the plan's code alignment
  bool aligned(const tq_paged_attention_call& c) const {
    return cache_aligned(c, static_cast<uintptr_t>(plan_.code_alignment > 0 ? plan_.code_alignment : 1));
  }

  std::mutex mutex_;
  bool valid_ = false;
  bool aligned_ = false;
  Key key_{};
  tq_cuda_paged_attention_plan_t plan_{};
};

template <typename Call>
class Launcher {
 public:
  size_t workspace(const Call& call) { return tq_cuda::workspace(&call); }
  int run(const Call& call) { return tq_cuda::launch(&call); }
};

template <>
class Launcher<tq_paged_attention_call> {
 public:
  size_t workspace(const tq_paged_attention_call& call) {
    tq_cuda_paged_attention_plan_t plan;
    return plans_.get(call, &plan) == 0 ? plan.workspace_bytes : 0;
  }
  int run(const tq_paged_attention_call& call) {
    tq_cuda_paged_attention_plan_t plan;
    if (int rc = plans_.get(call, &plan)) return rc;
    return tq_cuda_paged_attention_run(&plan, &call);
  }

 private:
  AttentionPlans plans_;
};

}  // namespace tq_cuda
