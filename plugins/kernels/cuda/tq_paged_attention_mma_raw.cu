// The tensor-core decode attention's raw-path instances: head dims other than 64/128/256, any
// widths, run as the 8-bit kernel of the head dim padded to a multiple of 16 (at least 32).
#include "tq_paged_attention_mma.cuh"

namespace tq_cuda {
namespace mma {

int launch_raw(const SplitArgs& args, const Plan& plan, unsigned units, int padded_dim, cudaStream_t stream) {
#define TQ_MMA_RAW_CASE(D) \
  case D: return launch<D, 8, 8, true>(args, plan, units, stream);
  switch (padded_dim) {
    TQ_MMA_RAW_CASE(32) TQ_MMA_RAW_CASE(48) TQ_MMA_RAW_CASE(64) TQ_MMA_RAW_CASE(80) TQ_MMA_RAW_CASE(96)
    TQ_MMA_RAW_CASE(112) TQ_MMA_RAW_CASE(128) TQ_MMA_RAW_CASE(144) TQ_MMA_RAW_CASE(160) TQ_MMA_RAW_CASE(176)
    TQ_MMA_RAW_CASE(192) TQ_MMA_RAW_CASE(208) TQ_MMA_RAW_CASE(224) TQ_MMA_RAW_CASE(240) TQ_MMA_RAW_CASE(256)
  }
#undef TQ_MMA_RAW_CASE
  return TQ_CUDA_BAD_ARGUMENT;
}

}  // namespace mma
}  // namespace tq_cuda
