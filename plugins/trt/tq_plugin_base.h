// Common IPluginV3 machinery of the TurboQuant TensorRT plugins (namespace "turboquant" = the
// ONNX node domain, name = the op name, version "1").
//
// A plugin implements the three V3One capabilities (core, build with I/O aliasing, runtime).
// What differs per op lives in an OpDef table (name, attributes, the dtype rule of each input
// and output, in-place pairs; all from the contract) and four hooks: output shapes, shape checks,
// workspace size, run (the op's call struct filled through CallIo, then its CUDA launcher;
// tq_plugins.h).
// Outputs that update an input in place alias it where TensorRT honours getAliasedInput, else
// start as a copy of it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "tq_cuda.h"
#include "tq_ops.h"

namespace tq_trt {

constexpr const char* kNamespace = tq_ops::kDomain;
constexpr const char* kVersion = "1";  // tq_ops::kDomainVersion as the plugin version string
static_assert(tq_ops::kDomainVersion == 1, "the plugin version string follows the domain version");

// The dtype a tensor position accepts: one fixed type, or a type parameter: the op's float type
// "T" or the cache norms' type "TN" (each float32 or float16, the same at every position of it).
enum class TypeParam { kNone, kT, kN };
struct TypeRule {
  TypeParam param;
  nvinfer1::DataType fixed;
  bool is_param() const { return param != TypeParam::kNone; }
};
constexpr TypeRule kT{TypeParam::kT, nvinfer1::DataType::kFLOAT};
constexpr TypeRule kN{TypeParam::kN, nvinfer1::DataType::kFLOAT};
constexpr TypeRule kF32{TypeParam::kNone, nvinfer1::DataType::kFLOAT};
constexpr TypeRule kU8{TypeParam::kNone, nvinfer1::DataType::kUINT8};
constexpr TypeRule kI32{TypeParam::kNone, nvinfer1::DataType::kINT32};
constexpr TypeRule kI64{TypeParam::kNone, nvinfer1::DataType::kINT64};

struct AttrDef {
  const char* name;
  bool is_float;
  bool required;
  float default_value;
  bool is_bits;     // an int in [tq_ops::kMinBits, tq_ops::kMaxBits]
  float min_value;  // floats: inclusive lower bound (and finite)
};

struct OpDef {
  const char* name;
  std::vector<AttrDef> attrs;
  std::vector<TypeRule> inputs;
  int32_t required_inputs;  // the inputs before the optional ones a node may leave out
  std::vector<TypeRule> outputs;
  std::vector<int32_t> aliased_input;  // per output: the input it updates in place, or -1
  int32_t norm_input = -1;             // the first input of the cache norms' type TN, or -1
};

// An op's description from the contract tables (plugins/common/tq_ops.h, generated from
// tq_deploy/ops.py): names, the dtype rule of each input and output, attributes, in-place pairs.
OpDef op_def(const tq_ops::Op& op);
// The OpDef of one op, made once.
template <const tq_ops::Op* kOp>
const OpDef& def_of() {
  static const OpDef def = op_def(*kOp);
  return def;
}

// Attribute values by the OpDef's attribute order (ints are stored as float exactly).
struct Attrs {
  std::vector<float> values;
  int get_int(size_t i) const { return static_cast<int>(values[i]); }
  float get_float(size_t i) const { return values[i]; }
};

tq_cuda_dtype float_type(nvinfer1::DataType t);

// A plugin's tensors as tq_ops::<op>::fill reads them (by the contract's enums): the inputs'
// dims, the I/O pointers (null when sizing a workspace at build time), the attributes, the float
// type of the first input and the type of the first cache norms input (TN).
class CallIo {
 public:
  static constexpr int kMaxInputs = 16;
  CallIo(const OpDef& def, const nvinfer1::PluginTensorDesc* desc, int32_t nb_inputs, const void* const* inputs,
         void* const* outputs, const Attrs& attrs);
  // From the largest shapes of the profile (getWorkspaceSize).
  CallIo(const OpDef& def, const nvinfer1::DynamicPluginTensorDesc* desc, int32_t nb_inputs, const Attrs& attrs);
  // null for an optional input the node leaves out (and for every input when sizing a workspace)
  const void* in(int i) const { return inputs_ && i < nb_inputs_ ? inputs_[i] : nullptr; }
  void* out(int i) const { return outputs_ ? outputs_[i] : nullptr; }
  int64_t dim(int i, int axis) const { return dims_[i].d[axis < 0 ? dims_[i].nbDims + axis : axis]; }
  int64_t rows(int i, int trailing) const;
  int64_t int_attr(int a) const { return attrs_.get_int(a); }
  double float_attr(int a) const { return attrs_.get_float(a); }
  int dtype() const { return float_type(type_); }
  int norm_dtype() const { return float_type(norm_type_); }

 private:
  nvinfer1::Dims dims_[kMaxInputs];
  int32_t nb_inputs_;
  const void* const* inputs_ = nullptr;
  void* const* outputs_ = nullptr;
  const Attrs& attrs_;
  nvinfer1::DataType type_;
  nvinfer1::DataType norm_type_ = nvinfer1::DataType::kFLOAT;
};

class TQPlugin : public nvinfer1::IPluginV3,
                 public nvinfer1::IPluginV3OneCore,
                 public nvinfer1::IPluginV3OneBuildV2,
                 public nvinfer1::IPluginV3OneRuntime {
 public:
  TQPlugin(const OpDef& def, Attrs attrs) : def_(def), attrs_(std::move(attrs)) {}
  ~TQPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return def_.name; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild(V2)
  int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(def_.outputs.size()); }
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out, int32_t nb_outputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types, int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs* shape_inputs,
                          int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept override {
    return input_count_ok(nb_inputs) ? workspace_bytes(inputs, nb_inputs) : 0;
  }
  int32_t getAliasedInput(int32_t output_index) noexcept override {
    return output_index >= 0 && output_index < static_cast<int32_t>(def_.aliased_input.size())
               ? def_.aliased_input[output_index]
               : -1;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc* out,
                        int32_t nb_outputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc* output_desc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

 protected:
  // Output shapes from input shapes (dims as expressions). Returns false on a bad rank.
  virtual bool output_shapes(const nvinfer1::DimsExprs* inputs, nvinfer1::DimsExprs* outputs,
                             nvinfer1::IExprBuilder& builder) const = 0;
  // Checks the inputs' shapes (nb_inputs of them: optional ones may be left out); a dimension of
  // -1 (unknown at build time) matches anything. Returns an empty string when consistent, else
  // the first problem found.
  virtual std::string check_shapes(const nvinfer1::Dims* inputs, int32_t nb_inputs) const = 0;
  virtual int run(const nvinfer1::PluginTensorDesc* input_desc, const void* const* inputs, void* const* outputs,
                  void* workspace, cudaStream_t stream) = 0;
  // Device scratch the op needs for the largest shapes of the profile (in[i].max).
  virtual size_t workspace_bytes(const nvinfer1::DynamicPluginTensorDesc*, int32_t nb_inputs) const = 0;
  // The required inputs and any number of the optional ones.
  bool input_count_ok(int32_t nb_inputs) const {
    return nb_inputs >= def_.required_inputs && nb_inputs <= static_cast<int32_t>(def_.inputs.size());
  }

  const OpDef& def_;
  Attrs attrs_;
  // The node's input count, from the last configurePlugin / onShapeChange (enqueue gets none).
  int32_t nb_inputs_ = 0;

 private:
  int32_t check(const nvinfer1::Dims* dims, int32_t nb_inputs, const char* where);
  std::vector<nvinfer1::PluginField> serialized_fields_;
  std::vector<int32_t> ints_;
  nvinfer1::PluginFieldCollection serialized_collection_{};
};

// Shape-check helpers: "" when fine, else a message naming the tensor, dimension, seen and expected.
std::string expect_rank(const char* tensor, const nvinfer1::Dims& d, int32_t rank);
std::string expect_dim(const char* tensor, const nvinfer1::Dims& d, int32_t axis, int64_t expected,
                       const char* expected_what);
int64_t volume(const nvinfer1::Dims& d);
int64_t element_size(nvinfer1::DataType type);

}  // namespace tq_trt
