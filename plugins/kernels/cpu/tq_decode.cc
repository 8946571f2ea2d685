// TQDecode kernel: x_hat = norm * Pi^T c[code], rows spread over threads.
#include <algorithm>
#include <vector>

#include "tq_codes.h"
#include "tq_kernels.h"
#include "tq_simd.h"

namespace tq {
namespace {

using detail::Dequantizer;

constexpr int64_t kRowsPerTask = 32;

struct DecodeJob {
  const uint8_t* codes;
  const float* norms;
  int64_t rows, dim;
  const float* rotation;
  const Dequantizer* dequantizer;
  float* x_hat;
};

// x_hat = (c[code] @ Pi) * norm, the reference's order.
TQ_MULTIVERSION void decode_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const DecodeJob*>(ctx);
  const int64_t begin = static_cast<int64_t>(task) * kRowsPerTask;
  const int64_t end = std::min(job.rows, begin + kRowsPerTask);
  std::vector<float> c(job.dequantizer->padded_dim());
  for (int64_t r = begin; r < end; ++r) {
    job.dequantizer->unpack(job.codes + r * job.dequantizer->packed, c.data());
    float* out = job.x_hat + r * job.dim;
    detail::matvec_transposed(job.rotation, c.data(), out, job.dim);
    const float norm = job.norms[r];
    for (int64_t i = 0; i < job.dim; ++i) out[i] *= norm;
  }
}

}  // namespace

void decode(const tq_decode_call& c, const Parallel& parallel) {
  const int64_t rows = c.rows;
  const Dequantizer dequantizer(c.codebook, c.bits, c.head_dim);
  DecodeJob job{c.codes, c.norms, rows, c.head_dim, c.rotation, &dequantizer, c.x_hat};
  parallel.for_each(static_cast<size_t>((rows + kRowsPerTask - 1) / kRowsPerTask), decode_task, &job);
}

}  // namespace tq
