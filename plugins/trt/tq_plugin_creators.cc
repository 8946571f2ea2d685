// IPluginCreatorV3One for each TurboQuant op and the library's two exported entry points.
//
// TensorRT loads the library with IPluginRegistry::loadLibrary (Python:
// get_plugin_registry().load_library(path); trtexec: --dynamicPlugins), which calls
// getCreators() and setLoggerFinder(). The plugin never calls the registry itself: TensorRT-RTX
// dropped deprecated IPluginRegistry methods, so its vtable differs from the 10.x headers this
// library is compiled against, and a registry call from here would land on the wrong method.
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "tq_plugins.h"
#include "tq_trt_log.h"

namespace tq_trt {
namespace {

bool is_int_field(nvinfer1::PluginFieldType t) {
  return t == nvinfer1::PluginFieldType::kINT32 || t == nvinfer1::PluginFieldType::kINT64 ||
         t == nvinfer1::PluginFieldType::kINT16 || t == nvinfer1::PluginFieldType::kINT8;
}

bool read_number(const nvinfer1::PluginField& f, double& value) {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case nvinfer1::PluginFieldType::kINT32: value = *static_cast<const int32_t*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT64: value = static_cast<double>(*static_cast<const int64_t*>(f.data)); return true;
    case nvinfer1::PluginFieldType::kINT16: value = *static_cast<const int16_t*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT8: value = *static_cast<const int8_t*>(f.data); return true;
    case nvinfer1::PluginFieldType::kFLOAT32: value = *static_cast<const float*>(f.data); return true;
    case nvinfer1::PluginFieldType::kFLOAT64: value = *static_cast<const double*>(f.data); return true;
    default: return false;
  }
}

// Attributes from a field collection, checked against the contract; on a bad, missing, unknown or
// wrongly typed one, logs why (naming it) and returns false, so the engine build stops there.
bool parse_attrs(const OpDef& def, const nvinfer1::PluginFieldCollection* fc, Attrs& attrs) {
  attrs.values.assign(def.attrs.size(), 0.f);
  std::vector<bool> seen(def.attrs.size(), false);
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    const nvinfer1::PluginField& f = fc->fields[i];
    if (f.name == nullptr) continue;
    size_t a = 0;
    while (a < def.attrs.size() && std::string(f.name) != def.attrs[a].name) ++a;
    if (a == def.attrs.size()) {
      std::string known;
      for (const AttrDef& d : def.attrs) known += (known.empty() ? "" : ", ") + std::string(d.name);
      log_error(std::string(def.name) + ": unknown attribute " + f.name + ", expected one of " + known);
      return false;
    }
    double v = 0;
    if (!read_number(f, v)) {
      log_error(std::string(def.name) + ": attribute " + f.name + " has an unsupported field type " +
                std::to_string(static_cast<int>(f.type)) + ", expected an int or float scalar");
      return false;
    }
    if (def.attrs[a].is_float == is_int_field(f.type)) {
      log_error(std::string(def.name) + ": attribute " + f.name + " has type " + (def.attrs[a].is_float ? "int" : "float") +
                ", expected " + (def.attrs[a].is_float ? "float" : "int"));
      return false;
    }
    attrs.values[a] = static_cast<float>(v);
    seen[a] = true;
  }
  for (size_t a = 0; a < def.attrs.size(); ++a) {
    const AttrDef& d = def.attrs[a];
    if (!seen[a]) {
      if (d.required) {
        log_error(std::string(def.name) + ": attribute " + d.name + " is required");
        return false;
      }
      attrs.values[a] = d.default_value;
    }
    const float v = attrs.values[a];
    if (d.is_bits && (v < tq_ops::kMinBits || v > tq_ops::kMaxBits || v != std::floor(v))) {
      log_error(std::string(def.name) + ": attribute " + d.name + "=" + std::to_string(v) + ", expected an int in " +
                std::to_string(tq_ops::kMinBits) + ".." + std::to_string(tq_ops::kMaxBits));
      return false;
    }
    if (d.is_float && !(std::isfinite(v) && v >= d.min_value)) {
      log_error(std::string(def.name) + ": attribute " + d.name + "=" + std::to_string(v) +
                ", expected a finite number >= " + std::to_string(d.min_value));
      return false;
    }
  }
  return true;
}

template <typename Plugin>
class Creator final : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit Creator(const OpDef& def) : def_(def) {
    for (const AttrDef& a : def.attrs)
      fields_.emplace_back(a.name, nullptr,
                           a.is_float ? nvinfer1::PluginFieldType::kFLOAT32 : nvinfer1::PluginFieldType::kINT32, 1);
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }

  nvinfer1::IPluginV3* createPlugin(const char*, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase) noexcept override {
    try {
      Attrs attrs;
      if (!parse_attrs(def_, fc, attrs)) return nullptr;
      return new Plugin(std::move(attrs));
    } catch (...) {
      log_error(std::string(def_.name) + ": createPlugin failed (out of memory)");
      return nullptr;
    }
  }
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
  const char* getPluginName() const noexcept override { return def_.name; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  const OpDef& def_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
};

}  // namespace
}  // namespace tq_trt

#define TQ_TRT_EXPORT extern "C" __attribute__((visibility("default")))

TQ_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { tq_trt::set_logger_finder(finder); }

TQ_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
#define TQ_TRT_CREATOR(stem, Pascal, float_types, norm_types) \
  static tq_trt::Creator<tq_trt::Pascal##Plugin> stem(tq_trt::Pascal##Plugin::def());
  TQ_FOR_EACH_OP(TQ_TRT_CREATOR)
#undef TQ_TRT_CREATOR
#define TQ_TRT_CREATOR_ENTRY(stem, Pascal, float_types, norm_types) &stem,
  static nvinfer1::IPluginCreatorInterface* const creators[] = {TQ_FOR_EACH_OP(TQ_TRT_CREATOR_ENTRY)};
#undef TQ_TRT_CREATOR_ENTRY
  // one creator per op of the contract
  static_assert(sizeof(creators) / sizeof(creators[0]) == sizeof(tq_ops::kAllOps) / sizeof(tq_ops::kAllOps[0]),
                "a creator for every op of plugins/common/tq_ops.h");
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}
