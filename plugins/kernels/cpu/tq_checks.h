// Data-dependent input checks shared by every runtime's glue. Each returns an empty string
// when the data is valid, else a message naming the input, the offending entry, the value
// seen and the range expected. Kernels assume these passed: they index memory with the data.
#pragma once

#include <cstdint>
#include <string>

namespace tq {

// bits in [tq_ops::kMinBits, tq_ops::kMaxBits] (1..8); `name` is the attribute name (bits, k_bits, v_bits).
std::string check_bits(const char* name, int64_t bits);

// The softmax scale: finite and >= 0 (0 means 1/sqrt(D)).
std::string check_scale(double scale);

// context_lens[s] in [0, M*B]; block_tables[s, j] in [0, N) for every j < ceil(ctx_s / B)
// (entries past a sequence's context are never read and may hold anything, e.g. -1).
std::string check_block_tables(const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs,
                               int64_t max_blocks, int64_t num_blocks, int64_t block_size);

// query_start [S + 1]: 0 first, num_tokens (T) last, non-decreasing, and at most context_lens[s] rows
// (query_start[s + 1] - query_start[s]) for sequence s.
std::string check_query_start(const int32_t* query_start, const int32_t* context_lens, int64_t num_seqs,
                              int64_t num_tokens);

// codebook[0 .. n) finite and strictly ascending: encode counts the midpoints of neighbours below a
// value, which is the nearest centroid only for ascending centroids, and a NaN centroid would turn
// every output that reads it into NaN without saying why. Host data only (the CPU providers).
std::string check_codebook_values(const char* name, const float* codebook, int64_t n);

// slot_mapping[t] < N*B (negative means skip).
std::string check_slot_mapping(const int64_t* slot_mapping, int64_t num_tokens, int64_t num_slots);

}  // namespace tq
