// TQEncode kernel: rows spread over threads, normalized, rotated by a blocked product, quantized.
#include <algorithm>
#include <cmath>
#include <vector>

#include "tq_codes.h"
#include "tq_kernels.h"
#include "tq_simd.h"

namespace tq {
namespace {

using detail::Quantizer;

constexpr int64_t kRowsPerTask = 32;

size_t task_count(int64_t rows) { return static_cast<size_t>((rows + kRowsPerTask - 1) / kRowsPerTask); }

TQ_INLINE int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// The rotation with rows zero-padded to a multiple of 8 floats, for the blocked products.
std::vector<float> padded_rotation(const float* rotation, int64_t dim) {
  const int64_t dp = round_up8(dim);
  std::vector<float> out(static_cast<size_t>(dim * dp), 0.f);
  for (int64_t i = 0; i < dim; ++i) std::copy(rotation + i * dim, rotation + (i + 1) * dim, out.begin() + i * dp);
  return out;
}

struct EncodeJob {
  const void* x;
  DType x_type;
  int64_t rows, dim;
  const float* rotation_padded;  // [dim, round_up8(dim)]
  const Quantizer* quantizer;
  uint8_t* codes;
  float* norms;
};

// A task encodes up to kRowsPerTask rows: normalize each (u = x / ||x||, zero rows stay zero),
// Y = U Pi^T with a blocked micro-kernel (4 outputs x 2 rows per step), then quantize and pack.
TQ_MULTIVERSION void encode_task(void* ctx, size_t task) {
  const auto& job = *static_cast<const EncodeJob*>(ctx);
  const int64_t d = job.dim, dp = round_up8(d);
  const int64_t begin = static_cast<int64_t>(task) * kRowsPerTask;
  const int64_t count = std::min(job.rows, begin + kRowsPerTask) - begin;
  std::vector<float> u(static_cast<size_t>(kRowsPerTask * dp), 0.f), y(static_cast<size_t>(kRowsPerTask * d));
  for (int64_t r = 0; r < count; ++r) {
    float* row = u.data() + r * dp;
    detail::load_as_float(job.x, job.x_type, (begin + r) * d, d, row);
    job.norms[begin + r] = detail::normalize(row, d);
  }
  const float* pi = job.rotation_padded;
  int64_t r = 0;
  for (; r + 2 <= count; r += 2) {
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) detail::dot_block<4, 2>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
    for (; i < d; ++i) detail::dot_block<1, 2>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
  }
  for (; r < count; ++r) {
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) detail::dot_block<4, 1>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
    for (; i < d; ++i) detail::dot_block<1, 1>(pi + i * dp, dp, u.data() + r * dp, dp, dp, y.data() + r * d + i, 1, d);
  }
  for (r = 0; r < count; ++r) job.quantizer->pack(y.data() + r * d, job.codes + (begin + r) * job.quantizer->packed);
}

}  // namespace

void encode(const tq_encode_call& c, const Parallel& parallel) {
  const int64_t rows = c.rows, dim = c.head_dim;
  const Quantizer quantizer(c.codebook, c.bits, dim);
  const std::vector<float> rotation_padded = padded_rotation(c.rotation, dim);
  EncodeJob job{c.x, static_cast<DType>(c.dtype), rows, dim, rotation_padded.data(), &quantizer, c.codes, c.norms};
  parallel.for_each(task_count(rows), encode_task, &job);
}

}  // namespace tq
