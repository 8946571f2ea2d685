#include "tq_checks.h"

#include <cmath>
#include <sstream>

#include "tq_ops.h"

namespace tq {

std::string check_bits(const char* name, int64_t bits) {
  if (bits >= tq_ops::kMinBits && bits <= tq_ops::kMaxBits) return {};
  std::ostringstream msg;
  msg << "attribute " << name << "=" << bits << ", expected one of " << tq_ops::kMinBits;
  for (int b = tq_ops::kMinBits + 1; b <= tq_ops::kMaxBits; ++b) msg << ", " << b;
  return msg.str();
}

std::string check_scale(double scale) {
  if (std::isfinite(scale) && scale >= 0) return {};
  std::ostringstream msg;
  msg << "attribute scale=" << scale << ", expected a finite number >= 0 (0 means 1/sqrt(D))";
  return msg.str();
}

std::string check_block_tables(const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs,
                               int64_t max_blocks, int64_t num_blocks, int64_t block_size) {
  const int64_t capacity = max_blocks * block_size;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t ctx = context_lens[s];
    if (ctx < 0 || ctx > capacity) {
      std::ostringstream msg;
      msg << "context_lens[" << s << "]=" << ctx << ", expected 0 <= context_lens <= max_blocks * block_size = "
          << max_blocks << " * " << block_size << " = " << capacity;
      return msg.str();
    }
    const int64_t used_blocks = (ctx + block_size - 1) / block_size;
    const int32_t* row = block_tables + s * max_blocks;
    for (int64_t j = 0; j < used_blocks; ++j) {
      if (row[j] < 0 || row[j] >= num_blocks) {
        std::ostringstream msg;
        msg << "block_tables[" << s << ", " << j << "]=" << row[j] << ", expected a cache block in [0, "
            << num_blocks << ") (entry used since context_lens[" << s << "]=" << ctx << ")";
        return msg.str();
      }
    }
  }
  return {};
}

std::string check_query_start(const int32_t* query_start, const int32_t* context_lens, int64_t num_seqs,
                              int64_t num_tokens) {
  std::ostringstream msg;
  if (query_start[0] != 0 || query_start[num_seqs] != num_tokens) {
    msg << "query_start runs from " << query_start[0] << " to " << query_start[num_seqs]
        << ", expected 0 to T = query.shape[0] = " << num_tokens;
    return msg.str();
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t rows = static_cast<int64_t>(query_start[s + 1]) - query_start[s];
    if (rows < 0) {
      msg << "query_start[" << s + 1 << "]=" << query_start[s + 1] << " < query_start[" << s
          << "]=" << query_start[s] << ", expected non-decreasing row offsets";
      return msg.str();
    }
    if (rows > context_lens[s]) {
      msg << "sequence " << s << " has " << rows << " query rows (query_start), expected <= context_lens[" << s
          << "] = " << context_lens[s];
      return msg.str();
    }
  }
  return {};
}

std::string check_codebook_values(const char* name, const float* codebook, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const bool finite = std::isfinite(codebook[i]);
    if (finite && (i == 0 || codebook[i] > codebook[i - 1])) continue;
    std::ostringstream msg;
    msg << name << "[" << i << "]=" << codebook[i];
    if (finite) msg << " <= " << name << "[" << i - 1 << "]=" << codebook[i - 1];
    msg << ", expected finite, strictly ascending centroids";
    return msg.str();
  }
  return {};
}

std::string check_slot_mapping(const int64_t* slot_mapping, int64_t num_tokens, int64_t num_slots) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] >= num_slots) {
      std::ostringstream msg;
      msg << "slot_mapping[" << t << "]=" << slot_mapping[t] << ", expected < num_blocks * block_size = "
          << num_slots << " (or negative to skip the token)";
      return msg.str();
    }
  }
  return {};
}

}  // namespace tq
