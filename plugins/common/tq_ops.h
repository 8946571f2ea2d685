// GENERATED from tq_deploy/ops.py by `python -m tq_deploy.export.op_tables --native plugins/common`: do not edit.
// tests/test_export.py fails when it drifts from the specs. The ONNX Runtime glue and the TensorRT
// plugins build their op descriptions (names, input/output types, attributes) from these tables,
// and fill each op's call struct (tq_calls.h) through fill().
#pragma once

#include "tq_calls.h"

namespace tq_ops {

constexpr const char* kDomain = "turboquant";
constexpr int kDomainVersion = 1;
constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;

// kT: the node's float type (float32 or float16), the same at every kT position of one node;
// kN: the paged cache's norm type (float32 or float16), the same at every kN position.
enum class Type { kT, kN, kFloat32, kUint8, kInt32, kInt64 };
enum class AttrKind { kInt, kFloat };

struct Tensor {
  const char* name;
  Type type;
  bool optional;  // a trailing input a node may leave out (its call field is then null)
};

struct Attr {
  const char* name;
  AttrKind kind;
  bool required;
  double default_value;  // when not required
  bool is_bits;          // a bit width: an int in [kMinBits, kMaxBits]
  double min_value;      // inclusive lower bound of a float (which must also be finite)
};

// Output `output` is input `input` updated in place (output <x>_out of input <x>).
struct InPlace {
  int input;
  int output;
};

struct Op {
  const char* name;
  const Tensor* inputs;
  int num_inputs;
  int num_required_inputs;  // the inputs before the optional ones
  const Tensor* outputs;
  int num_outputs;
  const Attr* attrs;
  int num_attrs;
  const InPlace* in_place;
  int num_in_place;
};

// fill(call, io) sets every field of an op's call struct but the launch ones (workspace,
// stream) from a runtime's view of one node. Io provides: const void* in(int input) (null for an
// optional input the node leaves out),
// void* out(int output), int64_t dim(int input, int axis) (axis < 0 counts from the end),
// int64_t rows(int input, int trailing) (the product of all but the trailing axes),
// int64_t int_attr(int), double float_attr(int), int dtype() and int norm_dtype() (tq_dtype of the
// kT and kN tensors). op_of(call pointer) is
// the table of a call struct's op, for code generic over the ops.

// TQEncode: Quantize vectors.
namespace encode {
enum Input { kX, kRotation, kCodebook, kNumInputs };
enum Output { kCodes, kNorms, kNumOutputs };
enum Attribute { kBits, kNumAttributes };
inline constexpr Tensor kInputs[] = {{"x", Type::kT, false}, {"rotation", Type::kFloat32, false}, {"codebook", Type::kFloat32, false}};
inline constexpr Tensor kOutputs[] = {{"codes", Type::kUint8, false}, {"norms", Type::kFloat32, false}};
inline constexpr Attr kAttrs[] = {{"bits", AttrKind::kInt, true, 0.0, true, -1e300}};
inline constexpr Op kOp = {"TQEncode", kInputs, 3, 3, kOutputs, 2, kAttrs, 1, nullptr, 0};
using Call = tq_encode_call;
template <typename Io>
void fill(Call& c, const Io& io) {
  c.x = io.in(kX); c.rotation = static_cast<const float*>(io.in(kRotation)); c.codebook = static_cast<const float*>(io.in(kCodebook));
  c.codes = static_cast<uint8_t*>(io.out(kCodes)); c.norms = static_cast<float*>(io.out(kNorms));
  c.rows = io.rows(kX, 1); c.head_dim = io.dim(kX, -1);
  c.bits = static_cast<int32_t>(io.int_attr(kBits));
  c.dtype = io.dtype();
}
}  // namespace encode
constexpr const Op& op_of(const tq_encode_call*) { return encode::kOp; }

// TQDecode: Reconstruct vectors.
namespace decode {
enum Input { kCodes, kNorms, kRotation, kCodebook, kNumInputs };
enum Output { kXHat, kNumOutputs };
enum Attribute { kBits, kNumAttributes };
inline constexpr Tensor kInputs[] = {{"codes", Type::kUint8, false}, {"norms", Type::kFloat32, false}, {"rotation", Type::kFloat32, false}, {"codebook", Type::kFloat32, false}};
inline constexpr Tensor kOutputs[] = {{"x_hat", Type::kFloat32, false}};
inline constexpr Attr kAttrs[] = {{"bits", AttrKind::kInt, true, 0.0, true, -1e300}};
inline constexpr Op kOp = {"TQDecode", kInputs, 4, 4, kOutputs, 1, kAttrs, 1, nullptr, 0};
using Call = tq_decode_call;
template <typename Io>
void fill(Call& c, const Io& io) {
  c.codes = static_cast<const uint8_t*>(io.in(kCodes)); c.norms = static_cast<const float*>(io.in(kNorms)); c.rotation = static_cast<const float*>(io.in(kRotation)); c.codebook = static_cast<const float*>(io.in(kCodebook));
  c.x_hat = static_cast<float*>(io.out(kXHat));
  c.rows = io.rows(kCodes, 1); c.head_dim = io.dim(kRotation, 0);
  c.bits = static_cast<int32_t>(io.int_attr(kBits));
}
}  // namespace decode
constexpr const Op& op_of(const tq_decode_call*) { return decode::kOp; }

// TQCacheUpdate: Encode new keys and values into their paged slots.
namespace cache_update {
enum Input { kKey, kValue, kSlotMapping, kKCodes, kKNorms, kVCodes, kVNorms, kRotation, kKCodebook, kVCodebook, kNumInputs };
enum Output { kKCodesOut, kKNormsOut, kVCodesOut, kVNormsOut, kNumOutputs };
enum Attribute { kKBits, kVBits, kNumAttributes };
inline constexpr Tensor kInputs[] = {{"key", Type::kT, false}, {"value", Type::kT, false}, {"slot_mapping", Type::kInt64, false}, {"k_codes", Type::kUint8, false}, {"k_norms", Type::kN, false}, {"v_codes", Type::kUint8, false}, {"v_norms", Type::kN, false}, {"rotation", Type::kFloat32, false}, {"k_codebook", Type::kFloat32, false}, {"v_codebook", Type::kFloat32, false}};
inline constexpr Tensor kOutputs[] = {{"k_codes_out", Type::kUint8, false}, {"k_norms_out", Type::kN, false}, {"v_codes_out", Type::kUint8, false}, {"v_norms_out", Type::kN, false}};
inline constexpr Attr kAttrs[] = {{"k_bits", AttrKind::kInt, true, 0.0, true, -1e300}, {"v_bits", AttrKind::kInt, true, 0.0, true, -1e300}};
inline constexpr InPlace kInPlace[] = {{kKCodes, kKCodesOut}, {kKNorms, kKNormsOut}, {kVCodes, kVCodesOut}, {kVNorms, kVNormsOut}};
inline constexpr Op kOp = {"TQCacheUpdate", kInputs, 10, 10, kOutputs, 4, kAttrs, 2, kInPlace, 4};
using Call = tq_cache_update_call;
template <typename Io>
void fill(Call& c, const Io& io) {
  c.key = io.in(kKey); c.value = io.in(kValue); c.slot_mapping = static_cast<const int64_t*>(io.in(kSlotMapping)); c.k_codes = static_cast<const uint8_t*>(io.in(kKCodes)); c.k_norms = io.in(kKNorms); c.v_codes = static_cast<const uint8_t*>(io.in(kVCodes)); c.v_norms = io.in(kVNorms); c.rotation = static_cast<const float*>(io.in(kRotation)); c.k_codebook = static_cast<const float*>(io.in(kKCodebook)); c.v_codebook = static_cast<const float*>(io.in(kVCodebook));
  c.k_codes_out = static_cast<uint8_t*>(io.out(kKCodesOut)); c.k_norms_out = io.out(kKNormsOut); c.v_codes_out = static_cast<uint8_t*>(io.out(kVCodesOut)); c.v_norms_out = io.out(kVNormsOut);
  c.num_tokens = io.dim(kKey, 0); c.num_kv_heads = io.dim(kKey, 1); c.head_dim = io.dim(kKey, 2); c.num_blocks = io.dim(kKCodes, 0); c.block_size = io.dim(kKCodes, 1);
  c.k_bits = static_cast<int32_t>(io.int_attr(kKBits)); c.v_bits = static_cast<int32_t>(io.int_attr(kVBits));
  c.dtype = io.dtype();
  c.norm_dtype = io.norm_dtype();
}
}  // namespace cache_update
constexpr const Op& op_of(const tq_cache_update_call*) { return cache_update::kOp; }

// TQPagedAttention: Decode attention over a TurboQuant paged cache, in the rotated domain.
namespace paged_attention {
enum Input { kQuery, kKCodes, kKNorms, kVCodes, kVNorms, kBlockTables, kContextLens, kRotation, kKCodebook, kVCodebook, kKeyMean, kRopeInvFreq, kNumInputs };
enum Output { kOut, kNumOutputs };
enum Attribute { kKBits, kVBits, kScale, kNumAttributes };
inline constexpr Tensor kInputs[] = {{"query", Type::kT, false}, {"k_codes", Type::kUint8, false}, {"k_norms", Type::kN, false}, {"v_codes", Type::kUint8, false}, {"v_norms", Type::kN, false}, {"block_tables", Type::kInt32, false}, {"context_lens", Type::kInt32, false}, {"rotation", Type::kFloat32, false}, {"k_codebook", Type::kFloat32, false}, {"v_codebook", Type::kFloat32, false}, {"key_mean", Type::kFloat32, true}, {"rope_inv_freq", Type::kFloat32, true}};
inline constexpr Tensor kOutputs[] = {{"out", Type::kT, false}};
inline constexpr Attr kAttrs[] = {{"k_bits", AttrKind::kInt, true, 0.0, true, -1e300}, {"v_bits", AttrKind::kInt, true, 0.0, true, -1e300}, {"scale", AttrKind::kFloat, false, 0.0, false, 0.0}};
inline constexpr Op kOp = {"TQPagedAttention", kInputs, 12, 10, kOutputs, 1, kAttrs, 3, nullptr, 0};
using Call = tq_paged_attention_call;
template <typename Io>
void fill(Call& c, const Io& io) {
  c.query = io.in(kQuery); c.k_codes = static_cast<const uint8_t*>(io.in(kKCodes)); c.k_norms = io.in(kKNorms); c.v_codes = static_cast<const uint8_t*>(io.in(kVCodes)); c.v_norms = io.in(kVNorms); c.block_tables = static_cast<const int32_t*>(io.in(kBlockTables)); c.context_lens = static_cast<const int32_t*>(io.in(kContextLens)); c.rotation = static_cast<const float*>(io.in(kRotation)); c.k_codebook = static_cast<const float*>(io.in(kKCodebook)); c.v_codebook = static_cast<const float*>(io.in(kVCodebook)); c.key_mean = static_cast<const float*>(io.in(kKeyMean)); c.rope_inv_freq = static_cast<const float*>(io.in(kRopeInvFreq));
  c.out = io.out(kOut);
  c.num_seqs = io.dim(kQuery, 0); c.num_q_heads = io.dim(kQuery, 1); c.head_dim = io.dim(kQuery, 2); c.num_blocks = io.dim(kKCodes, 0); c.block_size = io.dim(kKCodes, 1); c.num_kv_heads = io.dim(kKCodes, 2); c.max_blocks = io.dim(kBlockTables, 1);
  c.k_bits = static_cast<int32_t>(io.int_attr(kKBits)); c.v_bits = static_cast<int32_t>(io.int_attr(kVBits)); c.scale = static_cast<float>(io.float_attr(kScale));
  c.dtype = io.dtype();
  c.norm_dtype = io.norm_dtype();
}
}  // namespace paged_attention
constexpr const Op& op_of(const tq_paged_attention_call*) { return paged_attention::kOp; }

// TQPagedPrefill: Multi-token causal attention over a TurboQuant paged cache (chunked prefill; a decode step is the case of one token per sequence).
namespace paged_prefill {
enum Input { kQuery, kKCodes, kKNorms, kVCodes, kVNorms, kBlockTables, kContextLens, kQueryStart, kRotation, kKCodebook, kVCodebook, kKeyMean, kRopeInvFreq, kNumInputs };
enum Output { kOut, kNumOutputs };
enum Attribute { kKBits, kVBits, kScale, kNumAttributes };
inline constexpr Tensor kInputs[] = {{"query", Type::kT, false}, {"k_codes", Type::kUint8, false}, {"k_norms", Type::kN, false}, {"v_codes", Type::kUint8, false}, {"v_norms", Type::kN, false}, {"block_tables", Type::kInt32, false}, {"context_lens", Type::kInt32, false}, {"query_start", Type::kInt32, false}, {"rotation", Type::kFloat32, false}, {"k_codebook", Type::kFloat32, false}, {"v_codebook", Type::kFloat32, false}, {"key_mean", Type::kFloat32, true}, {"rope_inv_freq", Type::kFloat32, true}};
inline constexpr Tensor kOutputs[] = {{"out", Type::kT, false}};
inline constexpr Attr kAttrs[] = {{"k_bits", AttrKind::kInt, true, 0.0, true, -1e300}, {"v_bits", AttrKind::kInt, true, 0.0, true, -1e300}, {"scale", AttrKind::kFloat, false, 0.0, false, 0.0}};
inline constexpr Op kOp = {"TQPagedPrefill", kInputs, 13, 11, kOutputs, 1, kAttrs, 3, nullptr, 0};
using Call = tq_paged_prefill_call;
template <typename Io>
void fill(Call& c, const Io& io) {
  c.query = io.in(kQuery); c.k_codes = static_cast<const uint8_t*>(io.in(kKCodes)); c.k_norms = io.in(kKNorms); c.v_codes = static_cast<const uint8_t*>(io.in(kVCodes)); c.v_norms = io.in(kVNorms); c.block_tables = static_cast<const int32_t*>(io.in(kBlockTables)); c.context_lens = static_cast<const int32_t*>(io.in(kContextLens)); c.query_start = static_cast<const int32_t*>(io.in(kQueryStart)); c.rotation = static_cast<const float*>(io.in(kRotation)); c.k_codebook = static_cast<const float*>(io.in(kKCodebook)); c.v_codebook = static_cast<const float*>(io.in(kVCodebook)); c.key_mean = static_cast<const float*>(io.in(kKeyMean)); c.rope_inv_freq = static_cast<const float*>(io.in(kRopeInvFreq));
  c.out = io.out(kOut);
  c.num_tokens = io.dim(kQuery, 0); c.num_q_heads = io.dim(kQuery, 1); c.head_dim = io.dim(kQuery, 2); c.num_blocks = io.dim(kKCodes, 0); c.block_size = io.dim(kKCodes, 1); c.num_kv_heads = io.dim(kKCodes, 2); c.num_seqs = io.dim(kBlockTables, 0); c.max_blocks = io.dim(kBlockTables, 1);
  c.k_bits = static_cast<int32_t>(io.int_attr(kKBits)); c.v_bits = static_cast<int32_t>(io.int_attr(kVBits)); c.scale = static_cast<float>(io.float_attr(kScale));
  c.dtype = io.dtype();
  c.norm_dtype = io.norm_dtype();
}
}  // namespace paged_prefill
constexpr const Op& op_of(const tq_paged_prefill_call*) { return paged_prefill::kOp; }

inline constexpr const Op* kAllOps[] = {&encode::kOp, &decode::kOp, &cache_update::kOp, &paged_attention::kOp, &paged_prefill::kOp};

}  // namespace tq_ops
