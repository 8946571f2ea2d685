#include "ort_op_base.h"

#include "tq_checks.h"

namespace tq_ort {

void fail(const std::string& op, const std::string& message) {
  throw Ort::Exception(op + ": " + message, ORT_INVALID_ARGUMENT);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

const char* type_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another type";
  }
}

int64_t DimTable::bind(const std::string& symbol, int64_t value, const std::string& input, size_t axis) {
  const std::string where = input + ".shape[" + std::to_string(axis) + "]";
  auto found = dims_.find(symbol);
  if (found == dims_.end()) {
    dims_.emplace(symbol, Bound{value, where});
    return value;
  }
  if (found->second.value != value) {
    std::ostringstream msg;
    msg << "input " << input << " has " << where << "=" << value << " (" << symbol << "), expected " << symbol
        << "=" << found->second.value << " as in " << found->second.where;
    fail(op_, msg.str());
  }
  return value;
}

KernelIo::KernelIo(OrtKernelContext* context, std::string op, const std::vector<IoSpec>& inputs,
                   ONNXTensorElementDataType float_type)
    : context_(context), op_(std::move(op)), specs_(inputs), float_type_(float_type), dims_(op_) {}

Input KernelIo::input(size_t index, std::initializer_list<const char*> dims, bool check_rank) {
  const IoSpec& spec = specs_.at(index);
  Ort::ConstValue value = context_.GetInput(index);
  if (value == nullptr) fail(op_, std::string("input ") + spec.name + " is missing");
  auto info = value.GetTensorTypeAndShapeInfo();
  const ONNXTensorElementDataType expected = spec.type == kTypeT ? float_type_ : spec.type;
  if (info.GetElementType() != expected) {
    fail(op_, std::string("input ") + spec.name + " has element type " + type_name(info.GetElementType()) +
                  ", expected " + type_name(expected));
  }
  Input in{value, info.GetShape(), &spec};
  if (check_rank && dims.size() > 0) {
    if (in.shape.size() != dims.size()) {
      std::ostringstream msg;
      msg << "input " << spec.name << " has shape " << shape_str(in.shape) << " (rank " << in.shape.size()
          << "), expected rank " << dims.size() << " [";
      size_t i = 0;
      for (const char* d : dims) msg << (i++ ? ", " : "") << d;
      msg << "]";
      fail(op_, msg.str());
    }
    size_t axis = 0;
    for (const char* d : dims) {
      dims_.bind(d, in.shape[axis], spec.name, axis);
      ++axis;
    }
  }
  return in;
}

Ort::UnownedValue KernelIo::output(size_t index, const std::vector<int64_t>& shape) {
  return context_.GetOutput(index, shape);
}

namespace {
void run_on_ort_pool(void* runner, tq::Parallel::Task task, size_t total, void* task_ctx) {
  Ort::ThrowOnError(
      Ort::GetApi().KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(runner), task, total, 0, task_ctx));
}
}  // namespace

tq::Parallel KernelIo::parallel() const {
  tq::Parallel p;
  p.run = run_on_ort_pool;
  p.runner = context_.GetOrtKernelContext();
  return p;
}

void check_codebook(KernelIo& io, const Input& codebook, int64_t bits, const char* bits_name) {
  const int64_t expected = int64_t{1} << bits;
  if (codebook.shape.size() != 1 || codebook.shape[0] != expected) {
    std::ostringstream msg;
    msg << "input " << codebook.spec->name << " has shape " << shape_str(codebook.shape) << ", expected ["
        << expected << "] (2**" << bits_name << " centroids, " << bits_name << "=" << bits << ")";
    fail(io.op(), msg.str());
  }
}

void check_rotation(KernelIo& io, const Input& rotation) {
  if (rotation.shape.size() != 2 || rotation.shape[0] != rotation.shape[1] || rotation.shape[0] < 1) {
    fail(io.op(), "input rotation has shape " + shape_str(rotation.shape) + ", expected a square [D, D] with D >= 1");
  }
  io.dims().bind("D", rotation.shape[0], "rotation", 0);
}

int64_t required_int_attribute(const OrtKernelInfo* info, const char* op, const char* name) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    fail(op, std::string("attribute ") + name + " (int) is required");
  }
  return value;
}

int64_t checked_bits(const OrtKernelInfo* info, const char* op, const char* name) {
  const int64_t bits = required_int_attribute(info, op, name);
  const std::string problem = tq::check_bits(name, bits);
  if (!problem.empty()) fail(op, problem);
  return bits;
}

float float_attribute(const OrtKernelInfo* info, const char* name, float fallback) {
  float value = fallback;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

tq::DType to_dtype(ONNXTensorElementDataType type) {
  return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? tq::DType::kFloat16 : tq::DType::kFloat32;
}

}  // namespace tq_ort
