// The tensor-core decode attention's instances for head dim 128: every pair of bit widths 1..8.
#include "tq_paged_attention_mma.cuh"

namespace tq_cuda {
namespace mma {
TQ_MMA_DEFINE_LAUNCH_BITS(128, false)
}  // namespace mma
}  // namespace tq_cuda
