// The tensor-core decode attention's instances for head dim 128 with the key mean: every pair of bit
// widths 1..8.
#include "tq_paged_attention_mma.cuh"

namespace tq_cuda {
namespace mma {
TQ_MMA_DEFINE_LAUNCH_BITS(128, true)
}  // namespace mma
}  // namespace tq_cuda
