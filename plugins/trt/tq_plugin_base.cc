#include "tq_plugin_base.h"

#include <string>

#include "tq_cuda.h"
#include "tq_trt_log.h"

namespace tq_trt {

using nvinfer1::DataType;
using nvinfer1::Dims;

std::string expect_rank(const char* tensor, const Dims& d, int32_t rank) {
  if (d.nbDims == rank) return "";
  return std::string(tensor) + " has rank " + std::to_string(d.nbDims) + ", expected " + std::to_string(rank);
}

std::string expect_dim(const char* tensor, const Dims& d, int32_t axis, int64_t expected, const char* expected_what) {
  const int64_t seen = d.d[axis];
  if (seen < 0 || expected < 0 || seen == expected) return "";
  return std::string(tensor) + ".shape[" + std::to_string(axis) + "]=" + std::to_string(seen) + ", expected " +
         std::to_string(expected) + " (" + expected_what + ")";
}

OpDef op_def(const tq_ops::Op& op) {
  auto rule = [](tq_ops::Type t) -> TypeRule {
    switch (t) {
      case tq_ops::Type::kT: return kT;
      case tq_ops::Type::kN: return kN;
      case tq_ops::Type::kFloat32: return kF32;
      case tq_ops::Type::kUint8: return kU8;
      case tq_ops::Type::kInt32: return kI32;
      case tq_ops::Type::kInt64: return kI64;
    }
    return kF32;
  };
  OpDef def{op.name, {}, {}, op.num_required_inputs, {}};
  for (int i = 0; i < op.num_attrs; ++i) {
    const tq_ops::Attr& a = op.attrs[i];
    def.attrs.push_back({a.name, a.kind == tq_ops::AttrKind::kFloat, a.required, static_cast<float>(a.default_value),
                         a.is_bits, static_cast<float>(a.min_value)});
  }
  for (int i = 0; i < op.num_inputs; ++i) {
    def.inputs.push_back(rule(op.inputs[i].type));
    if (def.norm_input < 0 && op.inputs[i].type == tq_ops::Type::kN) def.norm_input = i;
  }
  for (int i = 0; i < op.num_outputs; ++i) def.outputs.push_back(rule(op.outputs[i].type));
  def.aliased_input.assign(op.num_outputs, -1);
  for (int i = 0; i < op.num_in_place; ++i) def.aliased_input[op.in_place[i].output] = op.in_place[i].input;
  return def;
}

CallIo::CallIo(const OpDef& def, const nvinfer1::PluginTensorDesc* desc, int32_t nb_inputs, const void* const* inputs,
               void* const* outputs, const Attrs& attrs)
    : nb_inputs_(nb_inputs), inputs_(inputs), outputs_(outputs), attrs_(attrs), type_(desc[0].type) {
  for (int32_t i = 0; i < nb_inputs && i < kMaxInputs; ++i) dims_[i] = desc[i].dims;
  if (def.norm_input >= 0 && def.norm_input < nb_inputs) norm_type_ = desc[def.norm_input].type;
}

CallIo::CallIo(const OpDef& def, const nvinfer1::DynamicPluginTensorDesc* desc, int32_t nb_inputs, const Attrs& attrs)
    : nb_inputs_(nb_inputs), attrs_(attrs), type_(desc[0].desc.type) {
  for (int32_t i = 0; i < nb_inputs && i < kMaxInputs; ++i) dims_[i] = desc[i].max;
  if (def.norm_input >= 0 && def.norm_input < nb_inputs) norm_type_ = desc[def.norm_input].desc.type;
}

int64_t CallIo::rows(int i, int trailing) const {
  int64_t n = 1;
  for (int32_t a = 0; a + trailing < dims_[i].nbDims; ++a) n *= dims_[i].d[a];
  return n;
}

int64_t volume(const Dims& d) {
  int64_t n = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) n *= d.d[i];
  return n;
}

int64_t element_size(DataType type) {
  switch (type) {
    case DataType::kFLOAT:
    case DataType::kINT32: return 4;
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
  }
}

nvinfer1::IPluginCapability* TQPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuildV2*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
  }
  return nullptr;
}

int32_t TQPlugin::check(const Dims* dims, int32_t nb_inputs, const char* where) {
  if (!input_count_ok(nb_inputs)) {
    const int32_t all = static_cast<int32_t>(def_.inputs.size());
    log_error(std::string(def_.name) + ": " + std::to_string(nb_inputs) + " inputs, expected " +
              (def_.required_inputs == all ? std::to_string(all)
                                           : std::to_string(def_.required_inputs) + " to " + std::to_string(all)));
    return -1;
  }
  nb_inputs_ = nb_inputs;
  const std::string problem = check_shapes(dims, nb_inputs);
  if (problem.empty()) return 0;
  log_error(std::string(def_.name) + " (" + where + "): " + problem);
  return -1;
}

int32_t TQPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                  const nvinfer1::DynamicPluginTensorDesc*, int32_t) noexcept {
  std::vector<Dims> dims(nb_inputs);
  for (int32_t i = 0; i < nb_inputs; ++i) dims[i] = in[i].desc.dims;
  return check(dims.data(), nb_inputs, "configurePlugin");
}

int32_t TQPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                                const nvinfer1::PluginTensorDesc*, int32_t) noexcept {
  std::vector<Dims> dims(nb_inputs);
  for (int32_t i = 0; i < nb_inputs; ++i) dims[i] = in[i].dims;
  return check(dims.data(), nb_inputs, "onShapeChange");
}

int32_t TQPlugin::getOutputDataTypes(DataType* output_types, int32_t nb_outputs, const DataType* input_types,
                                     int32_t nb_inputs) const noexcept {
  if (nb_outputs != getNbOutputs() || !input_count_ok(nb_inputs)) return -1;
  // "T" outputs take the float type of the first T input; codes outputs the type of the first
  // codes input, else int8: TensorRT rejects uint8 plugin I/O, so codes cross the TensorRT
  // boundary as int8 holding the same bytes (tq_deploy.runtime.tensorrt retypes the ONNX graph).
  DataType t = DataType::kFLOAT, n = DataType::kFLOAT, codes = DataType::kINT8;
  bool have_t = false, have_n = false, have_codes = false;
  for (int32_t i = 0; i < nb_inputs; ++i) {
    const TypeRule& r = def_.inputs[i];
    if (r.param == TypeParam::kT && !have_t) {
      t = input_types[i];
      have_t = true;
    } else if (r.param == TypeParam::kN && !have_n) {
      n = input_types[i];
      have_n = true;
    } else if (!r.is_param() && r.fixed == DataType::kUINT8 && !have_codes) {
      codes = input_types[i];
      have_codes = true;
    }
  }
  for (int32_t o = 0; o < nb_outputs; ++o) {
    const TypeRule& r = def_.outputs[o];
    output_types[o] = r.param == TypeParam::kT   ? t
                      : r.param == TypeParam::kN ? n
                      : (r.fixed == DataType::kUINT8 ? codes : r.fixed);
  }
  return 0;
}

int32_t TQPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*,
                                  int32_t, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                                  nvinfer1::IExprBuilder& expr_builder) noexcept {
  if (!input_count_ok(nb_inputs) || nb_outputs != getNbOutputs()) return -1;
  if (!output_shapes(inputs, outputs, expr_builder)) {
    log_error(std::string(def_.name) + ": input ranks do not match the op (see tq_deploy/ops.py)");
    return -1;
  }
  return 0;
}

bool TQPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                         int32_t nb_inputs, int32_t nb_outputs) noexcept {
  if (!input_count_ok(nb_inputs) || nb_outputs != getNbOutputs()) return false;
  const nvinfer1::PluginTensorDesc& desc = in_out[pos].desc;
  if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
  const TypeRule& rule = pos < nb_inputs ? def_.inputs[pos] : def_.outputs[pos - nb_inputs];
  if (!rule.is_param()) {
    if (rule.fixed != DataType::kUINT8) return desc.type == rule.fixed;
    // Packed codes: raw bytes, uint8 or (where TensorRT refuses uint8 plugin I/O) int8.
    if (desc.type != DataType::kUINT8 && desc.type != DataType::kINT8) return false;
    for (int32_t p = 0; p < pos; ++p) {  // every codes position has the same type
      const TypeRule& r = p < nb_inputs ? def_.inputs[p] : def_.outputs[p - nb_inputs];
      if (!r.is_param() && r.fixed == DataType::kUINT8) return in_out[p].desc.type == desc.type;
    }
    return true;
  }
  if (desc.type != DataType::kFLOAT && desc.type != DataType::kHALF) return false;
  // Every position of a type parameter takes the type of its first position (TensorRT asks in
  // order of pos).
  for (int32_t p = 0; p < pos; ++p) {
    const TypeRule& r = p < nb_inputs ? def_.inputs[p] : def_.outputs[p - nb_inputs];
    if (r.param == rule.param) return in_out[p].desc.type == desc.type;
  }
  return true;
}

int32_t TQPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc*,
                          const void* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  int rc = 0;
  // an output TensorRT did not alias to its in-place input starts as a copy of it
  for (size_t o = 0; o < def_.aliased_input.size() && rc == 0; ++o) {
    const int32_t i = def_.aliased_input[o];
    if (i < 0 || outputs[o] == inputs[i]) continue;
    const size_t bytes = static_cast<size_t>(volume(input_desc[i].dims) * element_size(input_desc[i].type));
    rc = static_cast<int>(cudaMemcpyAsync(outputs[o], inputs[i], bytes, cudaMemcpyDeviceToDevice, stream));
  }
  if (rc == 0) rc = run(input_desc, inputs, outputs, workspace, stream);
  if (rc != 0) {
    log_error(std::string(def_.name) + ": launch failed: " + tq_cuda_error_string(rc));
    return -1;
  }
  return 0;
}

const nvinfer1::PluginFieldCollection* TQPlugin::getFieldsToSerialize() noexcept {
  // Attributes travel as float32 or int32 fields pointing into attrs_ (alive as long as the plugin).
  serialized_fields_.clear();
  ints_.resize(def_.attrs.size());
  for (size_t i = 0; i < def_.attrs.size(); ++i) {
    const AttrDef& a = def_.attrs[i];
    if (a.is_float) {
      serialized_fields_.emplace_back(a.name, &attrs_.values[i], nvinfer1::PluginFieldType::kFLOAT32, 1);
    } else {
      ints_[i] = attrs_.get_int(i);
      serialized_fields_.emplace_back(a.name, &ints_[i], nvinfer1::PluginFieldType::kINT32, 1);
    }
  }
  serialized_collection_.nbFields = static_cast<int32_t>(serialized_fields_.size());
  serialized_collection_.fields = serialized_fields_.data();
  return &serialized_collection_;
}

}  // namespace tq_trt
