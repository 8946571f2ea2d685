// GENERATED from tq_deploy/ops.py by `python -m tq_deploy.export.op_tables --header plugins/common/tq_ops.h`: do not edit.
// tests/test_export.py fails when it drifts from the specs. The ONNX Runtime glue and the TensorRT
// plugins build their op descriptions (names, input/output types, attributes) from these tables.
#pragma once

namespace tq_ops {

constexpr const char* kDomain = "turboquant";
constexpr int kDomainVersion = 1;
constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;

// kT: the node's float type (float32 or float16), the same at every kT position of one node.
enum class Type { kT, kFloat32, kUint8, kInt32, kInt64 };
enum class AttrKind { kInt, kFloat };

struct Tensor {
  const char* name;
  Type type;
};

struct Attr {
  const char* name;
  AttrKind kind;
  bool required;
  double default_value;  // when not required
  bool is_bits;          // a bit width: an int in [kMinBits, kMaxBits]
  double min_value;      // inclusive lower bound of a float (which must also be finite)
};

struct Op {
  const char* name;
  const Tensor* inputs;
  int num_inputs;
  const Tensor* outputs;
  int num_outputs;
  const Attr* attrs;
  int num_attrs;
};

// TQEncode: Quantize vectors.
namespace encode {
enum Input { kX, kRotation, kCodebook, kNumInputs };
enum Output { kCodes, kNorms, kNumOutputs };
enum Attribute { kBits, kNumAttributes };
inline constexpr Tensor kInputs[] = {
    {"x", Type::kT},
    {"rotation", Type::kFloat32},
    {"codebook", Type::kFloat32},
};
inline constexpr Tensor kOutputs[] = {
    {"codes", Type::kUint8},
    {"norms", Type::kFloat32},
};
inline constexpr Attr kAttrs[] = {
    {"bits", AttrKind::kInt, true, 0.0, true, -1e300},
};
inline constexpr Op kOp = {"TQEncode", kInputs, 3, kOutputs, 2, kAttrs, 1};
}  // namespace encode

// TQDecode: Reconstruct vectors.
namespace decode {
enum Input { kCodes, kNorms, kRotation, kCodebook, kNumInputs };
enum Output { kXHat, kNumOutputs };
enum Attribute { kBits, kNumAttributes };
inline constexpr Tensor kInputs[] = {
    {"codes", Type::kUint8},
    {"norms", Type::kFloat32},
    {"rotation", Type::kFloat32},
    {"codebook", Type::kFloat32},
};
inline constexpr Tensor kOutputs[] = {
    {"x_hat", Type::kFloat32},
};
inline constexpr Attr kAttrs[] = {
    {"bits", AttrKind::kInt, true, 0.0, true, -1e300},
};
inline constexpr Op kOp = {"TQDecode", kInputs, 4, kOutputs, 1, kAttrs, 1};
}  // namespace decode

// TQCacheUpdate: Encode new keys and values into their paged slots.
namespace cache_update {
enum Input { kKey, kValue, kSlotMapping, kKCodes, kKNorms, kVCodes, kVNorms, kRotation, kKCodebook, kVCodebook, kNumInputs };
enum Output { kKCodesOut, kKNormsOut, kVCodesOut, kVNormsOut, kNumOutputs };
enum Attribute { kKBits, kVBits, kNumAttributes };
inline constexpr Tensor kInputs[] = {
    {"key", Type::kT},
    {"value", Type::kT},
    {"slot_mapping", Type::kInt64},
    {"k_codes", Type::kUint8},
    {"k_norms", Type::kFloat32},
    {"v_codes", Type::kUint8},
    {"v_norms", Type::kFloat32},
    {"rotation", Type::kFloat32},
    {"k_codebook", Type::kFloat32},
    {"v_codebook", Type::kFloat32},
};
inline constexpr Tensor kOutputs[] = {
    {"k_codes_out", Type::kUint8},
    {"k_norms_out", Type::kFloat32},
    {"v_codes_out", Type::kUint8},
    {"v_norms_out", Type::kFloat32},
};
inline constexpr Attr kAttrs[] = {
    {"k_bits", AttrKind::kInt, true, 0.0, true, -1e300},
    {"v_bits", AttrKind::kInt, true, 0.0, true, -1e300},
};
inline constexpr Op kOp = {"TQCacheUpdate", kInputs, 10, kOutputs, 4, kAttrs, 2};
}  // namespace cache_update

// TQPagedAttention: Decode attention over a TurboQuant paged cache, in the rotated domain.
namespace paged_attention {
enum Input { kQuery, kKCodes, kKNorms, kVCodes, kVNorms, kBlockTables, kContextLens, kRotation, kKCodebook, kVCodebook, kNumInputs };
enum Output { kOut, kNumOutputs };
enum Attribute { kKBits, kVBits, kScale, kNumAttributes };
inline constexpr Tensor kInputs[] = {
    {"query", Type::kT},
    {"k_codes", Type::kUint8},
    {"k_norms", Type::kFloat32},
    {"v_codes", Type::kUint8},
    {"v_norms", Type::kFloat32},
    {"block_tables", Type::kInt32},
    {"context_lens", Type::kInt32},
    {"rotation", Type::kFloat32},
    {"k_codebook", Type::kFloat32},
    {"v_codebook", Type::kFloat32},
};
inline constexpr Tensor kOutputs[] = {
    {"out", Type::kT},
};
inline constexpr Attr kAttrs[] = {
    {"k_bits", AttrKind::kInt, true, 0.0, true, -1e300},
    {"v_bits", AttrKind::kInt, true, 0.0, true, -1e300},
    {"scale", AttrKind::kFloat, false, 0.0, false, 0.0},
};
inline constexpr Op kOp = {"TQPagedAttention", kInputs, 10, kOutputs, 1, kAttrs, 3};
}  // namespace paged_attention

inline constexpr const Op* kAllOps[] = {&encode::kOp, &decode::kOp, &cache_update::kOp, &paged_attention::kOp};

}  // namespace tq_ops
