// The tensor-core decode attention's raw-path instances: head dims other than 64/128/256, any
// widths, run as the 8-bit kernel of the head dim padded to a multiple of 32.
#include "tq_paged_attention_mma.cuh"

namespace tq_cuda {
namespace mma {

int launch_raw(const SplitArgs& args, const Plan& plan, unsigned units, int padded_dim, cudaStream_t stream) {
  switch (padded_dim) {
    case 32: return launch<32, 8, 8, true>(args, plan, units, stream);
    case 64: return launch<64, 8, 8, true>(args, plan, units, stream);
    case 96: return launch<96, 8, 8, true>(args, plan, units, stream);
    case 128: return launch<128, 8, 8, true>(args, plan, units, stream);
    case 160: return launch<160, 8, 8, true>(args, plan, units, stream);
    case 192: return launch<192, 8, 8, true>(args, plan, units, stream);
    case 224: return launch<224, 8, 8, true>(args, plan, units, stream);
    case 256: return launch<256, 8, 8, true>(args, plan, units, stream);
  }
  return TQ_CUDA_BAD_ARGUMENT;
}

}  // namespace mma
}  // namespace tq_cuda
